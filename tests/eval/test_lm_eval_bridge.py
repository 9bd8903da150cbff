"""The lm-evaluation-harness bridge on a local task file, offline, on the tiny model."""

import json

import pytest

from finetune.resources import resource_dir

pytest.importorskip("lm_eval")


@pytest.mark.slow
def test_local_lm_eval_task_base_and_adapter(tiny_adapter, tmp_path):
    from finetune.eval import evaluate

    task_file = resource_dir("eval") / "lm_eval" / "tiny_mc.yaml"
    suite = tmp_path / "s.yaml"
    suite.write_text(f"name: lmx\ntasks:\n  - {{name: mc, lm_eval: {task_file}}}\n")
    card = evaluate(str(suite), ["base", str(tiny_adapter)], tmp_path / "ev", device="cpu", show=False)
    for col in ("base", card["models"][1]["name"]):
        acc = card["scores"][col]["mc/acc"]
        assert 0.0 <= acc <= 100.0 and acc * 4 / 100 == pytest.approx(round(acc * 4 / 100))
    assert json.loads((tmp_path / "ev" / "scores.json").read_text())["rows"][0]["key"] == "mc/acc"


def test_unknown_lm_eval_task_file(tmp_path):
    from finetune.errors import UsageError
    from finetune.eval.suites import load_suite

    suite = tmp_path / "s.yaml"
    suite.write_text("tasks:\n  - {lm_eval: missing.yaml}\n")
    with pytest.raises(UsageError, match="lm_eval task file not found"):
        load_suite(str(suite))
