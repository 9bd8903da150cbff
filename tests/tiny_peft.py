"""The tiny Llama as a ready-to-train peft model, shared by the parity tests (not a test file)."""

import torch

from finetune.config import load_config


def make_cfg(**overrides):
    base = {"output.progress": "false", "lora.dropout": "0.0", "train.gradient_checkpointing": "false"}
    return load_config("tiny-lora", {**base, **{k: str(v) for k, v in overrides.items()}})


def make_model(**overrides):
    """The tiny Llama as a peft model with non-zero LoRA B (so every LoRA weight gets a gradient)."""
    from finetune.models.load import load_model

    torch.manual_seed(0)
    model = load_model(make_cfg(**overrides), "cpu")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model
