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
