"""The planner counts the dtypes the model really holds: each GPU recipe's settings on a small random
model, built on the CPU with the GPU path's dtypes (precision=bf16-true: bf16 base and compute,
fp32 LoRA), one step so the optimizer state exists, then every static part (weights, quantization
constants, LoRA, optimizer state) against finetune.plan.predict within 2 %, and the dtype of the
layer inputs gradient checkpointing keeps against the planner's bytes per value."""

import pytest
import torch

from finetune.config import load_config
from finetune.models.load import load_tokenizer
from finetune.models.tiny import make_tiny_model
from finetune.plan.predict import _compute_bytes, _fp32_norms, predict
from finetune.training.build import build_step
from finetune.training.measure import static_bytes
from finetune.training.objectives.sft import synthetic_batch

pytest.importorskip("bitsandbytes")
pytestmark = [pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU"),
              pytest.mark.usefixtures("one_thread")]  # tests/conftest.py

# recipe -> (architecture, tied embeddings) of the model family it is written for
GPU_RECIPES = {
    "qlora-7b-alpaca": ("llama", False),
    "qlora-7b-sharegpt": ("llama", False),
    "qlora-8b-sharegpt": ("llama", False),
    "qlora-8b-longctx": ("llama", False),
    "lora-3b-alpaca": ("llama", True),
    "qlora-3b-sharegpt": ("qwen2", True),
}
STATIC = ("quantized_weights", "base_weights", "unquantized_weights", "lora_params", "optimizer_state")
SHAPE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=2048)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("static-dtypes")
    return {(arch, tied): make_tiny_model(root / f"{arch}-{tied}", arch=arch, tie_word_embeddings=tied, **SHAPE)
            for arch, tied in set(GPU_RECIPES.values())}


@pytest.mark.parametrize("recipe", sorted(GPU_RECIPES))
def test_static_bytes_and_checkpointed_dtype_match_the_planner(recipe, models):
    cfg = load_config(recipe, {"model.name": str(models[GPU_RECIPES[recipe]]), "accelerator": "cpu",
                               "precision": "bf16-true", "model.attn_implementation": "sdpa",
                               "output.progress": "false"})
    torch.manual_seed(0)
    step = build_step(cfg, "cpu", load_tokenizer(cfg.model))
    b = synthetic_batch(SHAPE["vocab_size"], 1, 64)
    seen = []
    layers = step.model.base_model.model.model.layers
    hooks = [m.register_forward_pre_hook(lambda m, a, kw: seen.append(
        (a[0] if a else kw["hidden_states"]).dtype), with_kwargs=True) for m in layers]
    loss, n = step.lossmod(b["input_ids"], b["labels"], b["position_ids"])
    for h in hooks:
        h.remove()
    (loss / n).backward()
    step.optimizer.step()

    measured = static_bytes(step.model, step.optimizer)
    plan = predict(cfg, 1, 64)
    for part in STATIC:
        got, want = sum(measured.get(part, {}).values()), plan.parts.get(part, 0)
        assert abs(got - want) <= 0.02 * max(want, 1), (part, got, want, measured)
    assert set(measured["unquantized_weights"]) == {"bfloat16"}  # embeddings, head, norms
    assert set(measured["lora_params"]) == {"float32"}
    c = _compute_bytes(cfg)
    residual = 4 if _fp32_norms(cfg, c) else c
    assert {t.itemsize for t in seen} == {residual}, seen  # what checkpointing keeps per layer
