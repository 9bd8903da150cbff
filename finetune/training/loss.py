"""The training loss: sum of token losses and the trained-token count, per micro-batch.

The loop divides by the trained tokens of the whole optimizer step (all micro-batches, all ranks),
so the loss is normalised the same way whatever the accumulation or device count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finetune.memory import lean
from finetune.moe.routing import load_balancing_loss

# --------------------------------------------------------------------------- the loss


class CausalLMLoss(nn.Module):
    """Wraps the peft model so that Fabric/DDP see one forward that returns (loss_sum, tokens).

    Running the head inside this forward lets the loss be computed `chunk` positions at a time,
    so full-sequence fp32 logits (seq x vocab x 4 bytes: 1 GiB for Llama-3 at 2k tokens) never
    exist at once. A frozen plain nn.Linear head (the usual LoRA case) goes through
    finetune.memory.lean.linear_cross_entropy, which forms d loss / d hidden in forward and keeps only
    that; any other head runs each chunk under activation checkpointing (recomputed in backward).
    """

    def __init__(self, model: nn.Module, chunk: int = 0, offload: bool = False, router_aux_coef: float = 0.0):
        super().__init__()
        self.model = model
        self.chunk = chunk
        self.offload = offload
        self.router_aux_coef = router_aux_coef

    def forward(self, input_ids, labels, position_ids):
        if self.offload:  # saved activations wait in (pinned) CPU RAM until backward needs them
            with torch.autograd.graph.save_on_cpu(pin_memory=input_ids.is_cuda):
                return self._forward(input_ids, labels, position_ids)
        return self._forward(input_ids, labels, position_ids)

    def _forward(self, input_ids, labels, position_ids):
        targets = labels[:, 1:]
        n_tokens = (targets != -100).sum()
        # attention_mask=None + position ids restarting per example = block-diagonal attention;
        # only with use_cache=False (with a cache, transformers lets packs attend across examples).
        kwargs = dict(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False)
        if self.router_aux_coef:
            kwargs["output_router_logits"] = True
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if not self.chunk:
            out = self.model(**kwargs)
            logits = out.logits[:, :-1]
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        else:
            out = getattr(base, base.base_model_prefix)(**kwargs)
            hidden, flat_targets = out.last_hidden_state[:, :-1].flatten(0, 1), targets.flatten()
            keep = flat_targets != -100  # untrained positions need no logits at all
            hidden, flat_targets = hidden[keep], flat_targets[keep]
            head = base.get_output_embeddings()
            if lean.fused_head_ok(head, hidden):
                # A frozen plain head: d loss / d hidden is formed in forward, chunk by chunk, and
                # is all that is kept for backward (no logits, no recompute).
                loss = lean.linear_cross_entropy(head, hidden, flat_targets, self.chunk)
            elif hidden.shape[0] <= self.chunk:
                # A single chunk is not recomputed: backward would rebuild the same logits, so the
                # recompute costs a head forward without lowering the peak.
                loss = _head_ce(head, hidden, flat_targets)
            else:
                loss = hidden.new_zeros((), dtype=torch.float32)
                for i in range(0, hidden.shape[0], self.chunk):
                    loss = loss + torch.utils.checkpoint.checkpoint(
                        _head_ce, head, hidden[i:i + self.chunk], flat_targets[i:i + self.chunk], use_reentrant=False)
        if self.router_aux_coef:
            # transformers' own aux_loss softmaxes router probabilities a second time
            # (huggingface/transformers#45120); ours forms probabilities exactly once. It is a
            # per-token mean, so weighting it by this micro-batch's tokens keeps the step's
            # normalisation by trained tokens intact.
            c = base.config
            aux = load_balancing_loss(out.router_logits, c.num_local_experts, c.num_experts_per_tok)
            loss = loss + self.router_aux_coef * aux * n_tokens
        return loss, n_tokens


def _head_ce(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")
