"""The QLoRA/LoRA dtype policy (finetune.runtime.kbit_frozen_dtypes, applied by finetune.models.load):
frozen embeddings, head and norms in the compute dtype, fp32 only for the trained tensors and their
optimizer state. On the CPU with bf16 (precision=bf16-true), which gives the GPU path's dtypes:
bf16 base, bf16 compute, fp32 LoRA."""

import pytest
import torch

from finetune.config import load_config
from finetune.models import load as load_mod
from finetune.models.load import load_tokenizer
from finetune.runtime import kbit_frozen_dtypes
from finetune.training.build import build_step
from finetune.training.measure import static_bytes
from finetune.training.objectives.sft import synthetic_batch
from tiny_peft import train_losses

pytest.importorskip("bitsandbytes")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _cfg(recipe: str = "tiny-qlora", **over):
    base = {"accelerator": "cpu", "precision": "bf16-true", "output.progress": "false", "lora.dropout": "0.0",
            "train.optimizer": "adamw"}
    return load_config(recipe, {**base, **{k: str(v) for k, v in over.items()}})


def _build(cfg, upcast: bool, monkeypatch):
    """build_step with the policy (upcast=False) or with peft's fp32 upcast left in place."""
    if upcast:
        monkeypatch.setattr(load_mod, "kbit_frozen_dtypes", lambda cfg, device: {"embeddings": None, "norms": None})
    else:
        monkeypatch.setattr(load_mod, "kbit_frozen_dtypes", kbit_frozen_dtypes)
    torch.manual_seed(cfg.train.seed)
    return build_step(cfg, "cpu", load_tokenizer(cfg.model))


def _dtypes_by_kind(model) -> dict[str, set]:
    out: dict[str, set] = {}
    for name, p in model.named_parameters():
        kind = ("lora" if "lora_" in name else "norm" if "norm" in name else "embed" if "embed_tokens" in name
                else "head" if "lm_head" in name else "linear4bit")
        out.setdefault(kind, set()).add(p.dtype)
    return out


def test_policy_says_fp32_only_for_what_is_trained():
    assert kbit_frozen_dtypes(_cfg(), "cpu") == {"embeddings": torch.bfloat16, "norms": torch.bfloat16}
    assert kbit_frozen_dtypes(_cfg(**{"quant.compute_dtype": "float16"}), "cpu") == \
        {"embeddings": torch.float16, "norms": None}  # fp16: norms stay fp32 for fp16's range
    assert kbit_frozen_dtypes(_cfg(precision="32-true"), "cpu") == {"embeddings": None, "norms": None}


def test_frozen_weights_in_compute_dtype_lora_and_optimizer_in_fp32(monkeypatch):
    cfg = _cfg()
    before = _dtypes_by_kind(_build(cfg, True, monkeypatch).model)
    assert before["embed"] == before["head"] == before["norm"] == {torch.float32}  # peft's k-bit upcast
    step = _build(cfg, False, monkeypatch)
    after = _dtypes_by_kind(step.model)
    assert after["embed"] == after["head"] == after["norm"] == {torch.bfloat16}
    assert after["lora"] == {torch.float32}
    b = synthetic_batch(step.model.get_output_embeddings().weight.shape[0], 1, 32)
    loss, n = step.lossmod(b["input_ids"], b["labels"], b["position_ids"])
    (loss / n).backward()
    step.optimizer.step()
    parts = static_bytes(step.model, step.optimizer)
    assert set(parts["optimizer_state"]) == {"float32"} and set(parts["lora_params"]) == {"float32"}
    assert set(parts["unquantized_weights"]) == {"bfloat16"}


def test_checkpointed_layer_inputs_are_in_the_compute_dtype(monkeypatch):
    """What gradient checkpointing keeps of each layer is its input: bf16 under the policy, fp32
    (twice the bytes) with peft's upcast norms feeding Linear4bit, which returns its input's dtype."""
    for upcast, expect in ((False, torch.bfloat16), (True, torch.float32)):
        step = _build(_cfg(**{"train.gradient_checkpointing": "true"}), upcast, monkeypatch)
        seen = []
        layers = step.model.base_model.model.model.layers
        hooks = [m.register_forward_pre_hook(lambda m, a, kw: seen.append(
            (a[0] if a else kw["hidden_states"]).dtype), with_kwargs=True) for m in layers]
        b = synthetic_batch(step.model.get_output_embeddings().weight.shape[0], 1, 32)
        loss, n = step.lossmod(b["input_ids"], b["labels"], b["position_ids"])
        for h in hooks:
            h.remove()
        assert seen and set(seen[1:]) == {expect}, (upcast, seen)


def _losses(cfg, upcast: bool, monkeypatch, steps: int = 8) -> list[float]:
    return train_losses(_build(cfg, upcast, monkeypatch), steps)


def test_loss_curve_matches_the_fp32_upcast_within_bf16_tolerance(monkeypatch):
    cfg = _cfg(**{"train.lr": "0.01"})
    ours, upcast = _losses(cfg, False, monkeypatch), _losses(cfg, True, monkeypatch)
    assert ours[-1] < ours[0] - 0.05  # it trains
    for a, b in zip(ours, upcast):
        assert abs(a - b) <= 2e-2 * abs(b), (ours, upcast)  # bf16 keeps 8 bits of mantissa: ~0.4% per op
