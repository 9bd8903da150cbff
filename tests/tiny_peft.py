"""Test fixtures on the tiny Llama (not a test file): a ready-to-train peft model for the parity
tests, and random LoRA adapters on disk for the merge, MoE and eval tests."""

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from finetune.config import Config, load_config
from finetune.memory.apply import apply_memory_features
from finetune.models.load import load_model


# "Hi!" <eos> "ab" in the tiny model's byte-level ids.
PROBE = torch.tensor([[1, 3 + ord("H"), 3 + ord("i"), 3 + ord("!"), 2, 3 + ord("a"), 3 + ord("b")]])


def lora_cfg(**lora) -> Config:
    """The default Config on the tiny model, no LoRA dropout, with `lora` section overrides."""
    cfg = Config()
    cfg.model.name = "tiny"
    cfg.lora.dropout = 0.0
    for k, v in lora.items():
        setattr(cfg.lora, k, v)
    return cfg


def logits(model, ids=PROBE):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def make_cfg(**overrides):
    base = {"output.progress": "false", "lora.dropout": "0.0", "train.gradient_checkpointing": "false"}
    return load_config("tiny-lora", {**base, **{k: str(v) for k, v in overrides.items()}})


def make_model(**overrides):
    """The tiny Llama as a peft model with the recipe's memory features, as training builds it, and
    non-zero LoRA B (so every LoRA weight gets a gradient)."""
    cfg = make_cfg(**overrides)
    torch.manual_seed(0)
    model = load_model(cfg, "cpu", gradient_checkpointing=cfg.train.gradient_checkpointing)
    apply_memory_features(model, cfg.train, "cpu")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def random_lora_adapter(path, base_dir, seed: int = 0, r: int = 4, alpha: int = 8,
                        target_modules="all-linear", scale: float = 0.05, **lora_kwargs) -> Path:
    """Save a LoRA adapter on `base_dir` with seeded random lora_A (x0.2) and lora_B (x`scale`).

    A fresh adapter (lora_B = 0) is a no-op; this one changes the outputs, the same way every run.
    """
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, lora_dropout=0.0,
                     task_type="CAUSAL_LM", **lora_kwargs)
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (scale if "lora_B" in name else 0.2))
    model.save_pretrained(str(path))
    return Path(path)


def train_losses(step, steps: int) -> list[float]:
    """Per-token losses of `steps` optimizer steps of a finetune.training.build.TrainingStep on two
    synthetic packed batches, alternating (so the loss must fall on a model that trains)."""
    from finetune.training.objectives.sft import synthetic_batch

    vocab = step.model.get_output_embeddings().weight.shape[0]
    out = []
    for i in range(steps):
        b = synthetic_batch(vocab, 2, 48, seed=i % 2)
        loss, n = step.lossmod(b["input_ids"], b["labels"], b["position_ids"])
        (loss / n).backward()
        step.optimizer.step()
        step.optimizer.zero_grad(set_to_none=True)
        out.append(float(loss.detach() / n))
    return out
