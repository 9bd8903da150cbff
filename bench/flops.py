"""FLOPs of one LoRA training step of a Llama-shaped model, counted from its shapes.

A matmul of (n x k) by (k x m) is 2nkm FLOPs. Per token through the body, every linear layer
(in x out) costs 2*in*out forward and, its weight frozen, 2*in*out backward for the gradient of
its input only (no weight gradient) -- except where nothing upstream needs that gradient: the
inputs of layer 0's q/k/v projections come from the frozen embeddings. A LoRA adapter of rank r on
that layer adds 2*r*(in + out) forward and, backward, the gradients of B (2*r*out), of the
low-rank activation (2*r*out), of A (2*in*r) and of the input (2*in*r; not in layer 0's q/k/v).
Attention: per (query, key) pair attended and head, q.k and p.v are 2*head_dim each forward
(4*head_dim), twice that backward (dS->dQ, dK and dP, dV); pairs are causal within each document
(n(n+1)/2 for a document of n tokens), so masked-out or padded pairs a kernel may still compute
do not count. The head (frozen, tied or not) is 2*hidden*vocab per position forward and the same
backward (the gradient of the hidden state), at the positions a trainer computes it: ours only at
trained positions, TRL and litgpt at every position of the batch. Norms, rotary embeddings,
SiLU, softmax, the loss and the optimizer are elementwise and not counted (model FLOPs, the
convention of MFU figures).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, cfg) -> "Shape":
        """From a transformers config (object or its dict)."""
        get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
        heads = get("num_attention_heads")
        return cls(layers=get("num_hidden_layers"), hidden=get("hidden_size"),
                   intermediate=get("intermediate_size"), heads=heads,
                   kv_heads=get("num_key_value_heads") or heads,
                   head_dim=get("head_dim") or get("hidden_size") // heads, vocab=get("vocab_size"))

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection of one decoder layer."""
        d, f, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def causal_pairs(doc_lengths: Iterable[int]) -> int:
    """(query, key) pairs of causal attention within each document."""
    return sum(n * (n + 1) // 2 for n in doc_lengths)


def step_flops(shape: Shape, rank: int, targets: Sequence[str], tokens: int, attn_pairs: int,
               head_positions: int) -> dict[str, int]:
    """FLOPs of one forward + backward over `tokens` body positions, by part (see the module doc)."""
    lin = shape.linears()
    bad = [t for t in targets if t not in lin]
    if bad:
        raise ValueError(f"unknown LoRA targets {bad}; known: {list(lin)}")
    frozen_fwd = sum(2 * i * o for i, o in lin.values()) * shape.layers * tokens
    no_input_grad = ("q_proj", "k_proj", "v_proj")  # layer 0: the embeddings need no gradient
    frozen_bwd = (sum(2 * i * o for i, o in lin.values()) * shape.layers
                  - sum(2 * lin[p][0] * lin[p][1] for p in no_input_grad)) * tokens
    lora_fwd = sum(2 * rank * (lin[t][0] + lin[t][1]) for t in targets) * shape.layers * tokens
    lora_bwd = (sum(2 * rank * (2 * lin[t][1] + 2 * lin[t][0]) for t in targets) * shape.layers
                - sum(2 * rank * lin[t][0] for t in targets if t in no_input_grad)) * tokens
    attn_fwd = 4 * shape.head_dim * shape.heads * shape.layers * attn_pairs
    head_fwd = 2 * shape.hidden * shape.vocab * head_positions
    parts = {"frozen_fwd": frozen_fwd, "frozen_bwd": frozen_bwd, "lora_fwd": lora_fwd, "lora_bwd": lora_bwd,
             "attn_fwd": attn_fwd, "attn_bwd": 2 * attn_fwd, "head_fwd": head_fwd, "head_bwd": head_fwd}
    parts["total"] = sum(parts.values())
    return parts


def run_flops(shape: Shape, rank: int, targets: Sequence[str], tokens: Sequence[int],
              attn_pairs: Sequence[int], head_positions: Sequence[int]) -> dict[str, int]:
    """step_flops summed over steps (one entry per step in each sequence)."""
    out: dict[str, int] = {}
    for t, a, h in zip(tokens, attn_pairs, head_positions, strict=True):
        for k, v in step_flops(shape, rank, targets, t, a, h).items():
            out[k] = out.get(k, 0) + v
    return out


def doc_lengths(positions: Sequence[int]) -> list[int]:
    """Document lengths of one packed row from its position ids: a document starts wherever the
    position does not increase (padding-free and packed rows restart at 0 per document)."""
    out: list[int] = []
    prev = None
    for p in positions:
        if prev is None or p <= prev:
            out.append(0)
        out[-1] += 1
        prev = p
    return out


def row_pairs(input_ids, pad_id: int, position_ids=None) -> int:
    """Causal pairs of a batch (tensors): each row's non-pad tokens, split into documents by its
    position ids where it has them (else one document per row)."""
    total = 0
    for r in range(input_ids.shape[0]):
        keep = input_ids[r] != pad_id
        if position_ids is None:
            total += causal_pairs([int(keep.sum())])
        else:
            total += causal_pairs(doc_lengths(position_ids[r][keep].tolist()))
    return total
