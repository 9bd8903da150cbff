"""Suite files: shipped suites parse, bad ones fail in one line; the scorecard's files and columns."""

import json

import pytest

from finetune.errors import UsageError
from finetune.eval.scorecard import to_markdown, write_scorecard
from finetune.eval.suites import load_suite
from finetune.resources import list_resources


@pytest.mark.parametrize("name", ["tiny", "demo", "moe-geo", "moe-units", "moe-verdict", "moe-mixed"])
def test_shipped_suites_parse_and_their_files_exist(name):
    s = load_suite(name)
    assert s.tasks and all(t.data_path is not None and t.data_path.is_file() for t in s.tasks)


def test_heldout_suites_name_cards_or_parse():
    for name in ("alpaca-heldout", "sharegpt-heldout"):
        assert name in list_resources("eval")


def test_overrides_apply_to_every_task():
    s = load_suite("tiny", n=2, max_new_tokens=3)
    assert all(t.n == 2 for t in s.tasks) and s.tasks[0].generation.max_new_tokens == 3


@pytest.mark.parametrize("body, match", [
    ("tasks: []", "non-empty list"),
    ("taks: []", "unknown key 'taks'"),
    ("tasks:\n  - {name: a, data: d.jsonl, metrics: [loss], generaton: {}}", "unknown key 'generaton'"),
    ("tasks:\n  - {name: a, data: d.jsonl, metrics: [loss], generation: {max_tokens: 3}}", "max_new_tokens"),
    ("tasks:\n  - {name: a, data: nope.jsonl, metrics: [loss]}", "neither a file"),
    ("tasks:\n  - {name: a, data: d.jsonl, metrics: [loss]}\n  - {name: a, data: d.jsonl, metrics: [chrf]}",
     "two tasks are named 'a'"),
])
def test_bad_suites(tmp_path, body, match):
    (tmp_path / "d.jsonl").write_text("{}\n")
    (tmp_path / "s.yaml").write_text(body + "\n")
    with pytest.raises(UsageError, match=match):
        load_suite(str(tmp_path / "s.yaml"))


def _card():
    return {"suite": "x", "description": "d", "models": [{"name": "base", "path": "/b", "kind": "base"},
                                                         {"name": "run/final", "path": "/r/final", "kind": "adapter"}],
            "rows": [{"key": "qa/loss", "task": "qa", "metric": "loss", "lower_is_better": True},
                     {"key": "qa/exact_match", "task": "qa", "metric": "exact_match", "lower_is_better": False}],
            "scores": {"base": {"qa/loss": 2.5, "qa/exact_match": 10.0},
                       "run/final": {"qa/loss": 1.25, "qa/exact_match": 60.0}},
            "tasks": {"qa": {"n": 10, "data": "d.jsonl"}}}


def test_markdown_columns_rows_and_deltas():
    md = to_markdown(_card())
    assert "| task | metric | base | run/final |" in md
    assert "| qa | loss ↓ | 2.5000 | 1.2500 (-1.2500) |" in md
    assert "| qa | exact_match ↑ | 10.00 | 60.00 (+50.00) |" in md


def test_scorecard_files(tmp_path):
    paths = write_scorecard(_card(), tmp_path, show=False)
    assert json.loads(paths["json"].read_text())["scores"]["run/final"]["qa/loss"] == 1.25
    assert paths["png"].read_bytes()[:4] == b"\x89PNG" and paths["md"].is_file()


def test_prompt_convention_defaults_and_overrides(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "2+2?", "answer": "4"}\n')
    (tmp_path / "s.yaml").write_text("tasks:\n  - {name: a, data: d.jsonl, metrics: [loss]}\n"
                                     "  - {name: b, data: d.jsonl, metrics: [loss], prompt: plain}\n"
                                     "  - {name: c, lm_eval: arc_easy}\n")
    assert [t.prompt for t in load_suite(str(tmp_path / "s.yaml")).tasks] == ["chat", "plain", "plain"]
    (tmp_path / "s.yaml").write_text("prompt: chat\n" + (tmp_path / "s.yaml").read_text())
    assert [t.prompt for t in load_suite(str(tmp_path / "s.yaml")).tasks] == ["chat", "plain", "chat"]
