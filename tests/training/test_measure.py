"""`finetune plan ... measure=true`: the planner against a real training step on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from finetune.config import load_config
from finetune.models.tiny import make_tiny_model
from finetune.plan.predict import predict
from finetune.training.measure import measure


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    # Big enough that weights, activations and logits all count (hidden 256, 4 layers, GQA, an
    # 8k vocabulary), small enough for a step in about a second.
    return make_tiny_model(tmp_path_factory.mktemp("mid") / "model", hidden_size=256, intermediate_size=704,
                           num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, vocab_size=8192)


@pytest.mark.parametrize("overrides", [
    {},
    {"quant.mode": "nf4"},
    {"lora.dropout": "0.05"},
    {"model.attn_implementation": "eager"},
    {"train.loss_chunk_size": "0"},
    {"train.lean_activations": "false"},
    {"lora.compute_dtype": "float32", "lora.dropout": "0.05"},  # peft's fp32 branch: an fp32 input copy each
], ids=["lora", "nf4", "dropout", "eager", "full-logits", "plain-autograd", "fp32-branch"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_planner_within_10_percent_of_measured_cpu_step(mid_model, overrides, precision):
    """At fp32 and with bf16 frozen weights (what precision=auto picks on a bf16 CPU), where the
    LoRA branches compute in bf16 on their bf16 input (lora.compute_dtype=auto)."""
    cfg = load_config("tiny-lora", {"model.name": str(mid_model), "data.seq_len": "512", "lora.dropout": "0",
                                    "train.loss_chunk_size": "256", "accelerator": "cpu", "precision": precision,
                                    **overrides})
    plan = predict(cfg, slack=0.0)
    predicted = plan.peak_bytes - plan.parts["cuda_context"]
    m = measure(cfg)
    assert m["live_before_step_bytes"] < m["peak_allocated_bytes"]
    assert abs(predicted / m["peak_allocated_bytes"] - 1) < 0.10, (predicted, m, plan.parts)


def test_measure_cli_json_and_quiet():
    r = subprocess.run([sys.executable, "-m", "finetune.cli", "plan", "recipe=tiny-lora", "measure=true",
                        "format=json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    m = rep["measured"]
    assert m["device"] == "cpu" and m["peak_allocated_bytes"] > 0
    # the four numbers side by side; static parts are counted tensor by tensor, so they agree closely
    assert rep["measured_peak_bytes"] == m["peak_allocated_bytes"] and rep["predicted_peak_bytes"] > 0
    assert abs(rep["predicted_static_bytes"] / rep["measured_static_bytes"] - 1) < 0.02, rep
    assert m["predicted_allocated_bytes"] > 0 and isinstance(m["error"], float)
    assert "profiler" not in r.stderr  # torch's profiler prints start/stop lines on fd 2


def test_measure_refuses_a_7b_on_the_cpu():
    r = subprocess.run([sys.executable, "-m", "finetune.cli", "plan", "recipe=qlora-7b-alpaca", "accelerator=cpu",
                        "measure=true"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "too big to measure" in r.stderr


def test_measure_runs_the_training_step_router_term_included(tmp_path, monkeypatch):
    # measure=true builds model, loss and optimizer with training's build_step, so a MoE recipe's
    # load-balancing term is part of the measured step as it is of training's.
    from finetune.training import build, loss

    moe = make_tiny_model(tmp_path / "moe", arch="mixtral", num_local_experts=2, num_experts_per_tok=1)
    built, aux_calls = [], []
    real_build, real_aux = build.build_step, loss.load_balancing_loss
    monkeypatch.setattr("finetune.training.measure.build_step",
                        lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    monkeypatch.setattr(loss, "load_balancing_loss", lambda *a, **k: aux_calls.append(1) or real_aux(*a, **k))
    cfg = load_config("tiny-lora", {"model.name": str(moe), "data.seq_len": "32", "lora.target_modules": "[q_proj]",
                                    "train.router_aux_loss_coef": "0.02"})
    m = measure(cfg)
    assert m["peak_allocated_bytes"] > 0
    assert built and built[0].lossmod.router_aux_coef == 0.02
    assert len(aux_calls) == 2  # one forward per measured step (the warm-up and the measured one)


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_planner_counts_a_preference_step_within_10_percent(mid_model, objective):
    # A micro-batch of pairs runs two sequences per unit (and, for dpo/kto, a no_grad reference
    # forward before them, which adds no peak). At the tests' fp32; at the CPU's bf16 the planner's
    # CPU constants are off for SFT alike (tests/plan).
    cfg = load_config("tiny-lora", {"model.name": str(mid_model), "data.seq_len": "512", "lora.dropout": "0",
                                    "train.loss_chunk_size": "256", "train.objective": objective})
    plan = predict(cfg, slack=0.0)
    m = measure(cfg)
    assert abs((plan.peak_bytes - plan.parts["cuda_context"]) / m["peak_allocated_bytes"] - 1) < 0.10, (m, plan.parts)


def test_measure_cli_on_tiny_dpo_within_10_percent():
    r = subprocess.run([sys.executable, "-m", "finetune.cli", "plan", "recipe=tiny-dpo", "measure=true",
                        "format=json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)["measured"]
    assert abs(m["error"]) < 0.10, m


def test_measure_runs_the_step_under_trainings_precision_plugin(mid_model, monkeypatch):
    """measure=true wraps the loss module with the Fabric precision plugin training gets: under
    bf16-mixed the forward runs under autocast (on a GPU that is what changes peft's LoRA path)."""
    import torch

    from finetune.training import measure as measure_module

    seen = []
    real = measure_module.build_step

    def build_step(cfg, device, tokenizer):
        step = real(cfg, device, tokenizer)
        step.model.register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cpu")))
        return step

    monkeypatch.setattr(measure_module, "build_step", build_step)
    cfg = load_config("tiny-lora", {"model.name": str(mid_model), "data.seq_len": "128", "accelerator": "cpu",
                                    "precision": "bf16-mixed"})
    measure_module.measure(cfg)
    assert seen and all(seen)
    seen.clear()
    measure_module.measure(load_config("tiny-lora", {"model.name": str(mid_model), "data.seq_len": "128",
                                                     "accelerator": "cpu", "precision": "32-true"}))
    assert seen and not any(seen)
