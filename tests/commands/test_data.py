"""`finetune data`: rendered examples, then the statistics, for a recipe's data."""

from finetune.commands.data import Args, run
from finetune.config import load_config


def test_shows_n_examples_and_the_statistics(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "200")
    cfg = load_config("tiny-lora", {"output.progress": "false"})
    assert run(Args(recipe="tiny-lora", n=2), cfg) == 0
    out = capsys.readouterr().out
    assert "example 1:" in out and "example 2:" in out and "example 3:" not in out
    assert "data statistics" in out and "packing efficiency" in out and "trained" in out


def test_preference_objective_shows_and_dumps_pairs(tmp_path, capsys, monkeypatch):
    import json

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "200")
    cfg = load_config("tiny-lora", {"output.progress": "false", "train.objective": "dpo",
                                    "data.card": "sample-preference", "data.val_fraction": "0"})
    dump = tmp_path / "pairs.jsonl"
    assert run(Args(n=1, dump=str(dump)), cfg) == 0
    out = capsys.readouterr().out
    assert "pair 1: prompt" in out and "--- chosen:" in out and "--- rejected:" in out and "pair 2" not in out
    assert "train pairs" in out and "48" in out and "packing efficiency" not in out
    assert "wrote 48 training pairs" in out
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(rows) == 48 and all(r["chosen"].endswith("<|im_end|>") and r["prompt"].endswith("assistant\n")
                                   for r in rows)


def test_kto_objective_shows_labelled_answers(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "200")
    cfg = load_config("tiny-lora", {"output.progress": "false", "train.objective": "kto",
                                    "data.card": "sample-preference", "data.val_fraction": "0"})
    assert run(Args(n=2), cfg) == 0
    out = capsys.readouterr().out
    assert "answer 1: prompt" in out and "completion (label true)" in out and "completion (label false)" in out
    assert "48 desirable, 48 undesirable" in out
