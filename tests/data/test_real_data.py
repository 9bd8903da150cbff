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


def test_glaive_every_call_trained_in_the_templates_format_no_observation(shared_data, tmp_path):
    """Every function call of the real glaive rows is trained as the tools-capable template renders
    it (<tool_call> JSON, arguments as an object), and no observation (tool result) is trained."""
    import json

    from helpers import TOOLS_TEMPLATE

    from finetune.data.dump import record, unpacked
    from finetune.models.tiny import byte_tokenizer

    src = shared_data / "sharegpt" / "glaive_toolcall_en_300.json"
    template = tmp_path / "tools.jinja"
    template.write_text(TOOLS_TEMPLATE)
    tk = byte_tokenizer()
    b = prepare(DataConfig(path=str(src), format="sharegpt", seq_len=16384, val_fraction=0.0,
                           chat_template=str(template)), tk, seed=0, progress=False)
    assert b.stats.examples == 300 and b.stats.truncated == 0
    assert b.stats.tool_rows == 191 and b.stats.tool_fallback == 0  # 109 rows have no tools ("[]")
    trained = [seg for ids, labels in unpacked(b.train) for seg in record(tk, ids, labels)["trained"]]
    calls = observations = 0
    for row in json.loads(src.read_text()):
        for turn in row["conversations"]:
            if turn["from"] == "function_call":
                call = json.loads(turn["value"])
                args = call["arguments"] if isinstance(call["arguments"], dict) else json.loads(call["arguments"])
                want = (f'<tool_call>\n{{"name": "{call["name"]}", "arguments": '
                        f'{json.dumps(args, ensure_ascii=False)}}}\n</tool_call><|im_end|>')
                assert any(seg.endswith(want) for seg in trained), want
                calls += 1
            elif turn["from"] == "observation":
                assert not any(turn["value"] in seg for seg in trained)
                observations += 1
    assert calls == observations == 211
    assert not any("<tool_response>" in seg for seg in trained)
