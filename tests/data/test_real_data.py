"""The shared real rows (../shared/data) load and tokenize with the tiny tokenizer; skipped when absent."""

import pytest
from conftest import SHARED

from finetune.config import DataConfig
from finetune.data.pipeline import prepare

pytestmark = [pytest.mark.shared, pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")]


@pytest.mark.parametrize("rel, fmt, rows", [
    ("alpaca/alpaca_cleaned_1000.json", "alpaca", 1000),
    ("sharegpt/vicuna_dummy_conversation.json", "sharegpt", 500),
    ("sharegpt/glaive_toolcall_en_300.json", "sharegpt", 300),
])
def test_real_data_loads_and_tokenizes(tok, rel, fmt, rows, capsys):
    b = prepare(DataConfig(path=str(SHARED / rel), format=fmt, seq_len=2048, val_fraction=0.0), tok,
                seed=0, progress=False)
    s = b.stats
    with capsys.disabled():
        print(f"\n{rel}: rows {s.rows_loaded}, examples {s.examples}, dropped {s.dropped}, tokens {s.tokens:,}, "
              f"trained {s.trained_fraction:.1%}, truncated {s.truncated}, packing {s.packing_efficiency:.1%}")
    assert s.rows_loaded == rows
    assert s.examples + s.dropped_total == rows and s.examples >= 0.95 * rows
    assert 0.05 < s.trained_fraction < 0.95
    if "glaive" in rel:  # the function calls are trained assistant turns: a '{"name"' follows a header
        assert any('{"name"' in tok.decode([t for t in u["labels"] if t != -100]) for u in b.train)
