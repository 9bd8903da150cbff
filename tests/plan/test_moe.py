"""The planner on Mixtral-shaped models: expert LoRA, trained routers, NF4 expert stacks."""

from __future__ import annotations

import pytest

from finetune.config import load_config
from finetune.models.tiny import make_tiny_model
from finetune.plan.predict import GiB, predict
from finetune.plan.shapes import model_shape


def test_planned_moe_name_is_the_base_with_experts():
    s = model_shape("8xsmollm2-135m")
    base = model_shape("smollm2-135m")
    assert (s.n_expert, s.expert_top_k, s.hidden, s.n_layer) == (8, 2, base.hidden, base.n_layer)
    assert s.n_params() > 6 * base.n_params() - 7 * base.vocab * base.hidden


def test_moe_8x1b_router_recipe_fits_12_gib():
    cfg = load_config("moe-8x1b-router", {"model.name": "8xmeta-llama/Llama-3.2-1B"})
    plan = predict(cfg)
    assert plan.shape.n_expert == 8 and plan.seq_len == 2048
    assert plan.peak_bytes <= 12 * GiB, plan.parts
    # experts counted NF4: 6.4e9 expert values at ~0.53 byte, not 13 GB of bf16
    assert plan.parts["quantized_weights"] < 4 * GiB and plan.parts["expert_stacks"] > 0
    no_router = load_config("moe-8x1b-router", {"model.name": "8xmeta-llama/Llama-3.2-1B",
                                                "lora.modules_to_save": "[]", "lora.target_parameters": "[]",
                                                "lora.target_modules": "[q_proj]"})
    assert predict(no_router).parts["lora_params"] < plan.parts["lora_params"]


@pytest.fixture(scope="module")
def mid_moe(tmp_path_factory):
    from finetune.moe.build import build_moe
    from finetune.moe.spec import parse_moe_config

    root = tmp_path_factory.mktemp("mid-moe")
    mid = make_tiny_model(root / "mid", hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=2, vocab_size=8192)
    spec = parse_moe_config({"base_model": str(mid), "gate_mode": "random", "experts": [{"source_model": str(mid)}] * 4})
    return build_moe(spec, str(root / "moe"))


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_moe_recipe_prediction_matches_a_measured_cpu_step(mid_moe, quant):
    # The moe-8x1b-router recipe at reduced size (4 experts of a hidden-256 model, seq 512) on the CPU.
    pytest.importorskip("bitsandbytes")
    from finetune.training.measure import measure

    cfg = load_config("moe-8x1b-router", {"model.name": str(mid_moe), "accelerator": "cpu", "data.seq_len": "512",
                                          "train.optimizer": "adamw", "quant.compute_dtype": "float32",
                                          "train.loss_chunk_size": "256", "quant.mode": quant})
    plan = predict(cfg, slack=0.0)
    predicted = plan.peak_bytes - plan.parts["cuda_context"]
    m = measure(cfg)
    assert abs(predicted / m["peak_allocated_bytes"] - 1) < 0.10, (predicted, m, plan.parts)
