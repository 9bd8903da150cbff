"""Sources, bad rows end to end, strict mode, empty data, validation split, cache, CLI acceptance."""

import json
import os

import pytest
from helpers import IM_END

from finetune.config import DataConfig
from finetune.data.pipeline import load_conversations, prepare
from finetune.errors import FinetuneError, UsageError

GOOD = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
MESSY = [
    GOOD,
    {"conversations": [{"from": "system", "value": "S"}, {"from": "user", "value": "q2"}, {"from": "assistant", "value": "a2"}]},
    {"conversations": [{"from": "gpt", "value": "hi!"}, {"from": "human", "value": "q3"}, {"from": "gpt", "value": "a3"}]},
    {"conversations": [{"from": "human", "value": "q4"}, {"from": "gpt", "value": "a4"}, {"from": "human", "value": "left"}]},
    {"conversations": [{"from": "human", "value": "q"}, {"from": "alien", "value": "x"}]},
    {"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "a"}]},
    {"conversations": [{"from": "human", "value": "no answer"}]},
    {"conversations": "not a list"},
    {"conversations": []},
    {"id": 7},
    {"conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "a"}]},
]


def write(tmp_path, name, rows):
    p = tmp_path / name
    p.write_text(rows if isinstance(rows, str) else json.dumps(rows))
    return str(p)


def cfg(path, fmt="sharegpt", **kw):
    return DataConfig(path=path, format=fmt, val_fraction=kw.pop("val_fraction", 0.0), seq_len=kw.pop("seq_len", 64), **kw)


def test_messy_sharegpt_dropped_by_reason(tmp_path, tok):
    b = prepare(cfg(write(tmp_path, "m.json", MESSY)), tok, seed=0, progress=False)
    s = b.stats
    assert s.rows_loaded == 11 and s.examples == 4
    assert s.dropped == {"unknown role": 1, "empty turn": 1, "no assistant turn": 1, "conversation not a list": 1,
                         "empty conversation": 1, "missing field": 1, "wrong type": 1}
    assert s.fixed == {"fixed: leading assistant turn dropped": 1, "fixed: trailing user turn trimmed": 1}
    assert s.first_where["unknown role"].endswith("m.json row 5")
    assert "rows dropped" in str(s) and "unknown role" in str(s)
    assert 0 < s.trained_tokens < s.tokens and s.packing_efficiency > 0


def test_strict_names_file_row_and_field(tmp_path, tok):
    p = write(tmp_path, "m.json", MESSY)
    with pytest.raises(UsageError, match=r"m\.json row 5: field 'conversations\[1\]\.from' unknown role"):
        prepare(cfg(p, strict=True), tok, seed=0, progress=False)


def test_broken_jsonl_line_number(tmp_path, tok):
    text = "\n".join([json.dumps(GOOD), json.dumps(GOOD), '{"conversations": [oops', "", json.dumps(GOOD)])
    p = write(tmp_path, "d.jsonl", text)
    s = prepare(cfg(p), tok, seed=0, progress=False).stats
    assert s.dropped == {"invalid JSON line": 1} and s.first_where["invalid JSON line"].endswith("d.jsonl line 3")
    with pytest.raises(UsageError, match=r"d\.jsonl line 3 col \d+: invalid JSON"):
        prepare(cfg(p, strict=True), tok, seed=0, progress=False)


def test_malformed_json_file_names_line_and_col(tmp_path, tok):
    p = write(tmp_path, "bad.json", '[\n {"a": 1},\n {"a": }\n]')
    with pytest.raises(UsageError, match=r"bad\.json line 3 col 8: invalid JSON"):
        prepare(cfg(p), tok, seed=0, progress=False)


def test_missing_unreadable_and_empty(tmp_path, tok):
    with pytest.raises(UsageError, match="data path not found"):
        prepare(cfg(str(tmp_path / "nope.json")), tok, seed=0, progress=False)
    with pytest.raises(UsageError, match="the dataset is empty"):
        prepare(cfg(write(tmp_path, "e.json", []), "alpaca"), tok, seed=0, progress=False)
    with pytest.raises(UsageError, match="no usable rows after filtering"):
        prepare(cfg(write(tmp_path, "b.json", MESSY[4:])), tok, seed=0, progress=False)
    p = write(tmp_path, "locked.json", [GOOD])
    os.chmod(p, 0)
    try:
        if os.access(p, os.R_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(UsageError, match="permission denied"):
            prepare(cfg(p), tok, seed=0, progress=False)
    finally:
        os.chmod(p, 0o600)


def test_hub_offline_is_one_line(monkeypatch, tok):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FinetuneError, match="cannot load dataset 'nobody/nothing'") as e:
        prepare(DataConfig(path="nobody/nothing", format="alpaca"), tok, seed=0, progress=False)
    assert "\n" not in str(e.value)


def test_formats_from_jsonl_csv_parquet_folder(tmp_path, tok):
    rows = [{"instruction": f"i{k}", "input": "", "output": f"o{k}"} for k in range(6)]
    import datasets

    (tmp_path / "f").mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "f" / "train.parquet"))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "r.csv"))
    write(tmp_path, "r.jsonl", "\n".join(map(json.dumps, rows)))
    for p in ("r.csv", "r.jsonl", "f"):
        convs, s = load_conversations(cfg(str(tmp_path / p), "alpaca"))
        assert len(convs) == 6 and s.rows_loaded == 6, p
        assert {c.messages[1]["content"] for c in convs} == {f"o{k}" for k in range(6)}


def test_val_split_fraction_and_file_and_max_rows(tmp_path, tok):
    rows = [{"instruction": f"i{k}", "output": f"o{k}"} for k in range(40)]
    p = write(tmp_path, "a.json", rows)
    a = load_conversations(cfg(p, "alpaca", val_fraction=0.25), seed=1, split="val")[0]
    b = load_conversations(cfg(p, "alpaca", val_fraction=0.25), seed=1, split="val")[0]
    t = load_conversations(cfg(p, "alpaca", val_fraction=0.25), seed=1, split="train")[0]
    assert a == b and len(a) == 10 and len(t) == 30
    assert not {c.messages[0]["content"] for c in a} & {c.messages[0]["content"] for c in t}
    assert a != load_conversations(cfg(p, "alpaca", val_fraction=0.25), seed=2, split="val")[0]
    v = write(tmp_path, "v.json", rows[:3])
    bundle = prepare(cfg(p, "alpaca", val_path=v, max_rows=12), tok, seed=0, progress=False)
    assert bundle.stats.examples == 12 and bundle.stats.val_examples == 3


def test_cache_roundtrip(tmp_path, tok):
    rows = [{"instruction": f"q{k}", "output": "a" * (k + 1)} for k in range(30)]
    c = cfg(write(tmp_path, "a.json", rows), "alpaca", val_fraction=0.1)
    cold = prepare(c, tok, seed=0, progress=False)
    warm = prepare(c, tok, seed=0, progress=False)
    assert not cold.stats.cached and warm.stats.cached
    assert warm.train == cold.train and warm.val == cold.val
    assert warm.stats.dropped == cold.stats.dropped and warm.stats.tokens == cold.stats.tokens
    assert not prepare(cfg(c.path, "alpaca", val_fraction=0.1, seq_len=128), tok, seed=0, progress=False).stats.cached


def test_truncation_counted_and_drop(tmp_path, tok):
    rows = [{"instruction": "q", "output": "x" * 100}, {"instruction": "y" * 100, "output": "z"},
            {"instruction": "q", "output": "ok"}]
    p = write(tmp_path, "a.json", rows)
    s = prepare(cfg(p, "alpaca", seq_len=48), tok, seed=0, progress=False).stats
    assert s.truncated == 1 and s.dropped == {"no trained tokens after truncation": 1} and s.examples == 2
    s = prepare(cfg(p, "alpaca", seq_len=48, truncation="drop"), tok, seed=0, progress=False).stats
    assert s.dropped == {"too long": 2} and s.examples == 1 and s.truncated == 0


def test_sample_cards(tok):
    for card, n in (("sample-alpaca", 60), ("sample-sharegpt", 30)):
        b = prepare(DataConfig(card=card, seq_len=512), tok, seed=0, progress=False)
        assert b.stats.rows_loaded == n and b.stats.dropped_total == 0, b.stats


def test_units_start_untrained(tmp_path, tok):
    b = prepare(DataConfig(card="sample-sharegpt", seq_len=512), tok, seed=0, progress=False)
    for u in b.train:
        for i, p in enumerate(u["position_ids"]):
            if p == 0:
                assert u["labels"][i] == -100
    trained = [t for u in b.train for t in u["labels"] if t != -100]
    assert trained.count(IM_END) >= 30  # every dialogue has at least one trained end-of-turn


def _cli(args, capsys):
    from finetune.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_data_acceptance(tmp_path, capsys):
    code, out, err = _cli(["data", "recipe=tiny-lora", f"data.path={write(tmp_path, 'm.json', MESSY)}",
                           "data.format=sharegpt", "n=1"], capsys)
    assert code == 0, err
    assert "unknown role" in out and "rows dropped" in out
    code, out, err = _cli(["data", "recipe=tiny-lora", f"data.path={write(tmp_path, 'e.json', [])}",
                           "data.format=alpaca"], capsys)
    assert code == 2 and err.count("\n") == 1 and "empty" in err
