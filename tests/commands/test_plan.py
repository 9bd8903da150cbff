"""`finetune plan`: the prediction printed as JSON or a table, and its arguments refused as typed."""

from __future__ import annotations

import json

import pytest

from finetune.commands.plan import Args, run
from finetune.config import load_config
from finetune.typed import build
from finetune.errors import UsageError
from finetune.plan.predict import GiB, predict


def cfg_of(recipe: str = "qlora-7b-alpaca"):
    return load_config(recipe, {})


def test_json_output(capsys):
    cfg = cfg_of()
    assert run(Args(recipe="qlora-7b-alpaca", gpu_memory="12GiB", format="json"), cfg) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("peak_bytes", "parts", "fits", "budget_bytes", "max_micro_batch", "max_seq_len"):
        assert key in out
    assert out["budget_bytes"] == 12 * GiB
    assert out["fits"] is True and out["max_micro_batch"] >= 2 and out["max_seq_len"] >= 1024


def test_cli_acceptance(capsys):
    from finetune.cli import run as cli_run

    assert cli_run(["plan", "recipe=qlora-7b-alpaca", "gpu_memory=12GiB", "format=json"]) == 0
    assert json.loads(capsys.readouterr().out)["peak_bytes"] == predict(cfg_of("qlora-7b-alpaca")).peak_bytes


def test_table_output(capsys):
    run(Args(recipe="qlora-7b-alpaca"), cfg_of())
    text = capsys.readouterr().out
    assert "quantized weights" in text and "largest micro-batch" in text


def test_table_suggests_mlp_tiling(capsys):
    run(Args(recipe="qlora-8b-sharegpt"), cfg_of("qlora-8b-sharegpt"))
    assert "with train.mlp_tile_size=2048: largest seq_len" in capsys.readouterr().out
    run(Args(recipe="qlora-8b-longctx"), cfg_of("qlora-8b-longctx"))
    assert "with train.mlp_tile_size" not in capsys.readouterr().out


def test_slack_out_of_range_is_refused_where_it_is_parsed():
    with pytest.raises(UsageError, match=r"slack must be in \[0, 1\), got 1.5"):
        build(Args, {"recipe": "qlora-7b-alpaca", "slack": "1.5"})


@pytest.mark.parametrize("forced, counted", [("bf16", "bf16-true"), ("fp32", "32-true")])
def test_auto_on_the_cpu_is_planned_as_measure_true_runs_it(capsys, monkeypatch, forced, counted):
    """`finetune plan recipe=tiny-lora` (accelerator cpu, precision=auto) predicts the dtypes
    training picks there, the same prediction measure=true makes with the precision it resolved."""
    monkeypatch.setenv("FINETUNE_CPU_PRECISION", forced)
    cfg = cfg_of("tiny-lora")
    assert cfg.accelerator == "cpu" and cfg.precision == "auto"
    assert run(Args(recipe="tiny-lora", format="json"), cfg) == 0
    plain = json.loads(capsys.readouterr().out)
    assert run(Args(recipe="tiny-lora", format="json", measure=True), cfg_of("tiny-lora")) == 0
    measured = json.loads(capsys.readouterr().out)
    assert plain["peak_bytes"] == measured["peak_bytes"] == predict(load_config("tiny-lora", {"precision": counted})).peak_bytes
    assert plain["parts"] == measured["parts"] and "precision" not in plain["notes"]
