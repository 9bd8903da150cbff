"""What every objective's loss is built from: the model's forward as training runs it, the head +
cross-entropy a chunk of positions at a time, the MoE router's load-balancing term, activation offload.

An objective (finetune.training.objectives) wraps the peft model in a loss module whose forward
Fabric/DDP see as one. Running the head inside that forward lets the loss be computed `chunk`
positions at a time, so full-sequence fp32 logits (seq x vocab x 4 bytes: 1 GiB for Llama-3 at 2k
tokens) never exist at once. A frozen plain nn.Linear head (the usual LoRA case) goes through
finetune.memory.lean.linear_cross_entropy, which forms d loss / d hidden in forward and keeps only
that; any other head runs each chunk under activation checkpointing (recomputed in backward).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from finetune.config import TrainConfig
from finetune.memory import lean
from finetune.moe.routing import load_balancing_loss


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft model (the model itself when it is not one)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_outputs(model: nn.Module, input_ids, position_ids, *, with_head: bool, router_logits: bool = False):
    """The model's forward as training runs it: with its head (`.logits`) or the decoder alone
    (`.last_hidden_state`, for a head run chunk by chunk); `.router_logits` when asked."""
    # attention_mask=None + position ids restarting per example = block-diagonal attention;
    # only with use_cache=False (with a cache, transformers lets packs attend across examples).
    kwargs = dict(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False)
    if router_logits:
        kwargs["output_router_logits"] = True
    if with_head:
        return model(**kwargs)
    base = unwrap(model)
    return getattr(base, base.base_model_prefix)(**kwargs)


def token_loss_sum(model: nn.Module, input_ids, position_ids, targets, chunk: int, router_logits: bool = False):
    """(the model's outputs, the sum of -log p(target) over positions whose target is not -100).

    `targets` are the labels shifted by one (targets[:, i] is what position i predicts). chunk=0:
    the model's own head over every position; else the head over trained positions only,
    `chunk` at a time (`head_loss_sum`)."""
    if not chunk:
        out = model_outputs(model, input_ids, position_ids, with_head=True, router_logits=router_logits)
        logits = out.logits[:, :-1]
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        return out, loss
    out = model_outputs(model, input_ids, position_ids, with_head=False, router_logits=router_logits)
    hidden, flat_targets = out.last_hidden_state[:, :-1].flatten(0, 1), targets.flatten()
    keep = flat_targets != -100  # untrained positions need no logits at all
    head = unwrap(model).get_output_embeddings()
    return out, head_loss_sum(head, hidden[keep], flat_targets[keep], chunk)


def head_loss_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Sum of the cross-entropy of head(hidden) against targets, `chunk` rows at a time."""
    if lean.fused_head_ok(head, hidden):
        # A frozen plain head: d loss / d hidden is formed in forward, chunk by chunk, and is all
        # that is kept for backward (no logits, no recompute).
        return lean.linear_cross_entropy(head, hidden, targets, chunk)
    if hidden.shape[0] <= chunk:
        # A single chunk is not recomputed: backward would rebuild the same logits, so the
        # recompute costs a head forward without lowering the peak.
        return _head_ce(head, hidden, targets)
    loss = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[0], chunk):
        loss = loss + torch.utils.checkpoint.checkpoint(
            _head_ce, head, hidden[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
    return loss


def _head_ce(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def router_aux_loss(model: nn.Module, out) -> torch.Tensor:
    """The MoE load-balancing term of a forward run with router_logits=True: a per-token mean.

    transformers' own aux_loss softmaxes router probabilities a second time
    (huggingface/transformers#45120); this forms probabilities exactly once."""
    c = unwrap(model).config
    return load_balancing_loss(out.router_logits, c.num_local_experts, c.num_experts_per_tok)


def offloaded(enabled: bool, pin_memory: bool):
    """While active, saved activations wait in (pinned) CPU RAM until backward needs them."""
    return torch.autograd.graph.save_on_cpu(pin_memory=pin_memory) if enabled else contextlib.nullcontext()


def head_chunk(train: TrainConfig, model: nn.Module) -> int:
    """Positions per chunk of the head + cross-entropy (0 = the plain, unchunked loss)."""
    # The chunked head runs outside the model's own forward; a trained lm_head would then miss
    # DDP's gradient sync, so it falls back to the plain loss.
    head_trained = any(p.requires_grad for p in model.get_output_embeddings().parameters())
    return 0 if head_trained else train.loss_chunk_size
