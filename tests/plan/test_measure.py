"""`finetune plan ... measure=true`: the planner against a real training step on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from finetune.config import load_config
from finetune.plan.measure import measure, synthetic_batch
from finetune.plan.predict import predict
from finetune.models.tiny import make_tiny_model


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    # Big enough that weights, activations and logits all count (hidden 256, 4 layers, GQA, an
    # 8k vocabulary), small enough for a step in about a second.
    return make_tiny_model(tmp_path_factory.mktemp("mid") / "model", hidden_size=256, intermediate_size=704,
                           num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, vocab_size=8192)


def test_synthetic_batch_packs_two_examples_per_row():
    b = synthetic_batch(100, 2, 10)
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]] * 2
    assert (b["labels"] == b["input_ids"]).all() and (b["input_ids"] > 0).all()


@pytest.mark.parametrize("overrides", [
    {},
    {"quant.mode": "nf4"},
    {"lora.dropout": "0.05"},
    {"model.attn_implementation": "eager"},
    {"train.loss_chunk_size": "0"},
    {"train.lean_activations": "false"},
], ids=["lora", "nf4", "dropout", "eager", "full-logits", "plain-autograd"])
def test_planner_within_10_percent_of_measured_cpu_step(mid_model, overrides):
    cfg = load_config("tiny-lora", {"model.name": str(mid_model), "data.seq_len": "512", "lora.dropout": "0",
                                    "train.loss_chunk_size": "256", **overrides})
    plan = predict(cfg, slack=0.0)
    predicted = plan.peak_bytes - plan.parts["cuda_context"]
    m = measure(cfg)
    assert m["live_before_step_bytes"] < m["peak_allocated_bytes"]
    assert abs(predicted / m["peak_allocated_bytes"] - 1) < 0.10, (predicted, m, plan.parts)


def test_measure_cli_json_and_quiet():
    r = subprocess.run([sys.executable, "-m", "finetune.cli", "plan", "recipe=tiny-lora", "measure=true",
                        "format=json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)["measured"]
    assert m["device"] == "cpu" and m["peak_allocated_bytes"] > 0
    assert m["predicted_allocated_bytes"] > 0 and isinstance(m["error"], float)
    assert "profiler" not in r.stderr  # torch's profiler prints start/stop lines on fd 2


def test_measure_refuses_a_7b_on_the_cpu():
    r = subprocess.run([sys.executable, "-m", "finetune.cli", "plan", "recipe=qlora-7b-alpaca", "accelerator=cpu",
                        "measure=true"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "too big to measure" in r.stderr
