"""Preference tuning as a user runs it, at the default precision (the CPU's bf16 probe forced both
ways): `finetune recipe=tiny-dpo` with its held-out preference suite from the CLI, and every
objective through the Python API."""

import csv
import json
import os
import subprocess
import sys

import pytest

import finetune
from finetune.training.checkpoint import is_complete


@pytest.mark.parametrize("probe", ["bf16", "fp32"])
def test_tiny_dpo_from_the_cli_with_its_preference_suite(tmp_path, probe):
    out = tmp_path / "dpo"
    env = {**os.environ, "FINETUNE_CPU_PRECISION": probe}
    r = subprocess.run([sys.executable, "-m", "finetune.cli", "recipe=tiny-dpo", f"out_dir={out}",
                        "train.max_steps=3", "eval.suite=tiny-pref", "output.progress=false"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert is_complete(out / "final")
    rows = list(csv.DictReader((out / "logs" / "metrics.csv").open()))
    assert [int(row["step"]) for row in rows if row.get("train_loss")] == [1, 2, 3]
    assert abs(float(rows[0]["train_loss"]) - 0.6931) < 1e-3  # LoRA B = 0: policy = reference
    assert {"reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected"} <= rows[0].keys()
    scores = json.loads(next(out.rglob("scores.json")).read_text())
    assert "pairs/reward_accuracy" in json.dumps(scores) and "pairs/win_rate" in json.dumps(scores)


@pytest.mark.parametrize("objective", ["orpo", "simpo", "kto"])
def test_every_objective_trains_through_the_python_api(tmp_path, monkeypatch, objective):
    monkeypatch.setenv("FINETUNE_CPU_PRECISION", "bf16")
    final = finetune.train("tiny-dpo", **{"out_dir": str(tmp_path / objective), "train.objective": objective,
                                          "train.max_steps": 2, "output.progress": False})
    assert is_complete(final)
