"""What a training step needs, built one way: the model, its objective's loss and its optimizer.

Training (finetune.training.loop) and `finetune plan ... measure=true` (finetune.training.measure)
both call `build_step`, so what the planner is checked against is the step training runs: the
same memory features, the same chunked loss with the same router term, the same optimizer.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Union

import torch
from torch import nn

from finetune.config import Config
from finetune.memory.apply import MemoryFeatures, apply_memory_features
from finetune.models.load import load_model
from finetune.runtime import compile_layers
from finetune.training.compile import compile_decoder_layers
from finetune.training.objectives import objective_for


class TrainingStep(NamedTuple):
    model: nn.Module  # the PeftModel (its config, save_pretrained, adapter weights)
    lossmod: nn.Module  # what runs forward: model + head + the objective's loss
    optimizer: torch.optim.Optimizer
    trainable: list  # the trained parameters, whole (FSDP later turns them into shards)
    memory: MemoryFeatures
    compiled_layers: int = 0  # decoder layers under torch.compile (train.compile)


def build_step(cfg: Config, device: Union[str, torch.device], tokenizer) -> TrainingStep:
    """The recipe's peft model on `device` in training mode, with its memory features, its objective's
    loss module and optimizer. The caller seeds the RNG first (the LoRA init draws from it)."""
    device = torch.device(device)
    model = load_model(cfg, device, tokenizer=tokenizer, gradient_checkpointing=cfg.train.gradient_checkpointing)
    # from_pretrained leaves the base in eval mode; until the first validation switched it, LoRA
    # dropout was off and transformers skipped gradient checkpointing (it checkpoints only in training).
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    memory = apply_memory_features(model, cfg.train, device)
    # Last: what is compiled is the forward the memory features left (finetune.training.compile).
    compiled = compile_decoder_layers(model) if compile_layers(cfg.train.compile, device) else 0
    lossmod = objective_for(cfg).loss_module(model)
    return TrainingStep(model, lossmod, make_optimizer(cfg, trainable), trainable, memory, compiled)


def make_optimizer(cfg: Config, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """train.optimizer over `params`: torch's AdamW or a bitsandbytes paged / 8-bit variant."""
    t = cfg.train
    kwargs = dict(lr=t.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    # Imported only for these optimizers: bitsandbytes may be missing or unable to load on a
    # machine, and a recipe with torch's AdamW and no quantization does not need it.
    import bitsandbytes as bnb

    cls = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "adamw_8bit": bnb.optim.AdamW8bit,
           "paged_adamw": bnb.optim.PagedAdamW}[t.optimizer]
    return cls(params, **kwargs)


def lr_lambda(cfg: Config) -> Callable[[int], float]:
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at max_steps."""
    t = cfg.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f
