"""What a training step needs, built one way: the model, its loss and its optimizer.

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
from finetune.training.loss import CausalLMLoss


class TrainingStep(NamedTuple):
    model: nn.Module  # the PeftModel (its config, save_pretrained, adapter weights)
    lossmod: CausalLMLoss  # what runs forward: model + head + loss
    optimizer: torch.optim.Optimizer
    trainable: list  # the trained parameters, whole (FSDP later turns them into shards)
    memory: MemoryFeatures


def build_step(cfg: Config, device: Union[str, torch.device], tokenizer) -> TrainingStep:
    """The recipe's peft model on `device` in training mode, with its memory features, loss module
    and optimizer. The caller seeds the RNG first (the LoRA init draws from it)."""
    device = torch.device(device)
    model = load_model(cfg, device, tokenizer=tokenizer, gradient_checkpointing=cfg.train.gradient_checkpointing)
    # from_pretrained leaves the base in eval mode; until the first validation switched it, LoRA
    # dropout was off and transformers skipped gradient checkpointing (it checkpoints only in training).
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    memory = apply_memory_features(model, cfg.train, device)
    lossmod = CausalLMLoss(model, chunk=loss_chunk(cfg, model), offload=cfg.train.offload_activations,
                           router_aux_coef=cfg.train.router_aux_loss_coef)
    return TrainingStep(model, lossmod, make_optimizer(cfg, trainable), trainable, memory)


def loss_chunk(cfg: Config, model: nn.Module) -> int:
    """Positions per chunk of the head + cross-entropy (0 = the plain, unchunked loss)."""
    # The chunked head runs outside the model's own forward; a trained lm_head would then miss
    # DDP's gradient sync, so it falls back to the plain loss.
    head_trained = any(p.requires_grad for p in model.get_output_embeddings().parameters())
    return 0 if head_trained else cfg.train.loss_chunk_size


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
