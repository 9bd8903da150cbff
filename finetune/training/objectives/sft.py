"""Supervised fine-tuning: conversations -> tokens with the assistant's turns trained -> packed units;
the loss is the causal-LM cross-entropy summed over trained tokens, normalised by their count.

The loop divides by the trained tokens of the whole optimizer step (all micro-batches, all ranks),
so the loss is normalised the same way whatever the accumulation or device count.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from finetune.data import pipeline
from finetune.data.mix import prepare_data
from finetune.data.pack import collate
from finetune.training.loss import head_chunk, offloaded, router_aux_loss, token_loss_sum
from finetune.training.objectives.base import Objective


class SFT(Objective):
    name = "sft"
    batch_keys = ("input_ids", "labels", "position_ids")
    defining = ("train.router_aux_loss_coef",)

    def prepare(self, tokenizer, progress: bool = True) -> pipeline.DataBundle:
        return prepare_data(self.cfg.data, tokenizer, seed=self.cfg.train.seed, progress=progress)

    def collate(self, units: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
        return collate(units, pad_id)

    def blank(self, unit: dict) -> dict:
        return {**unit, "labels": [-100] * len(unit["input_ids"])}

    def synthetic_batch(self, vocab: int, micro_batch: int, seq_len: int) -> dict[str, torch.Tensor]:
        # Packed like training packs when the recipe packs (the planner counts the mask that brings).
        return synthetic_batch(vocab, micro_batch, seq_len, self.cfg.train.seed, packed=self.cfg.data.packing)

    def loss_module(self, model: nn.Module) -> "CausalLMLoss":
        t = self.cfg.train
        return CausalLMLoss(model, chunk=head_chunk(t, model), offload=t.offload_activations,
                            router_aux_coef=t.router_aux_loss_coef)

    def trained_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())


class CausalLMLoss(nn.Module):
    """Wraps the peft model so that Fabric/DDP see one forward that returns (loss_sum, tokens): the
    cross-entropy of every trained token (labels != -100), through the chunked or fused head of
    finetune.training.loss when `chunk` > 0, plus the MoE router term when its coefficient is set."""

    def __init__(self, model: nn.Module, chunk: int = 0, offload: bool = False, router_aux_coef: float = 0.0):
        super().__init__()
        self.model = model
        self.chunk = chunk
        self.offload = offload
        self.router_aux_coef = router_aux_coef

    def forward(self, input_ids, labels, position_ids):
        with offloaded(self.offload, pin_memory=input_ids.is_cuda):
            return self._forward(input_ids, labels, position_ids)

    def _forward(self, input_ids, labels, position_ids):
        targets = labels[:, 1:]
        n_tokens = (targets != -100).sum()
        out, loss = token_loss_sum(self.model, input_ids, position_ids, targets, self.chunk,
                                   router_logits=bool(self.router_aux_coef))
        if self.router_aux_coef:
            # A per-token mean: weighting it by this micro-batch's tokens keeps the step's
            # normalisation by trained tokens intact.
            loss = loss + self.router_aux_coef * router_aux_loss(self.model, out) * n_tokens
        return loss, n_tokens


def synthetic_batch(vocab: int, micro_batch: int, seq_len: int, seed: int = 0, packed: bool = True) -> dict:
    """Random ids, every position trained; packed: two examples per row (position ids restart
    halfway, so attention gets packing's block-diagonal mask), else one causal sequence per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (micro_batch, seq_len), generator=g)
    half = seq_len // 2 if packed else seq_len
    pos = torch.cat([torch.arange(half), torch.arange(seq_len - half)]).expand(micro_batch, -1).contiguous()
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": pos}
