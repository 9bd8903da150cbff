"""Router (gate) initialisation for an assembled MoE, with mergekit-moe's semantics.

Every mode returns a tensor of shape (num_layers, num_experts, hidden_size): row e of layer l is
the router weight of expert e in layer l (Mixtral's `mlp.gate.weight[l]`).

* hidden: for each layer l, the residual-stream hidden state *entering* layer l
  (`output_hidden_states[l]`) at the last token of each prompt, averaged over the expert's positive
  prompts, minus the same average over its negative prompts, L2-normalised per layer.
* cheap_embed: input embeddings summed over each prompt's tokens and over the prompts, normalised;
  the same for the negative prompts; their difference normalised again (mergekit normalises the
  positive and the negative sums separately before subtracting). The row is the same in every layer.
* random: standard normal entries (mergekit's `torch.randn`).
* uniform_random: torch.nn.Linear's default init, U(-1/sqrt(hidden), 1/sqrt(hidden)).

Prompts are tokenized like mergekit does (`bos_token + prompt`, no other special tokens) with
`prompt_format: raw` (the default, so mergekit configs behave the same); `prompt_format: chat`
renders each prompt as a user turn through the tokenizer's chat template with the generation
prompt, which matches what a chat fine-tune sees at inference. Each prompt is run on its own, so
"last token" never lands on padding.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from finetune.errors import UsageError

log = logging.getLogger(__name__)

PARALLEL_COS = 0.95  # gate rows closer than this route their experts alike


def prompt_ids(tokenizer, prompt: str, prompt_format: str = "raw") -> list[int]:
    """Token ids for one gate prompt (see module docstring for the two formats)."""
    if prompt_format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError("prompt_format: chat, but the base tokenizer has no chat template; use raw")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = (tokenizer.bos_token or "") + prompt
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UsageError(f"gate prompt {prompt!r} tokenizes to nothing")
    return list(ids)


@torch.no_grad()
def hidden_vector(model, tokenizer, prompts: Sequence[str], prompt_format: str = "raw") -> torch.Tensor:
    """(num_layers, hidden): mean over prompts of each layer's input hidden state at the last token."""
    device = next(model.parameters()).device
    acc = None
    for p in prompts:
        ids = torch.tensor([prompt_ids(tokenizer, p, prompt_format)], device=device)
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        # hidden_states[0] is the embedding output = input of layer 0; the last entry is after
        # the final norm and feeds no layer, so it is dropped (as mergekit does).
        h = torch.stack([hs[0, -1].float().cpu() for hs in out.hidden_states[:-1]])
        acc = h if acc is None else acc + h
    return acc / len(prompts)


def cheap_embed_vector(embed: torch.Tensor, tokenizer, prompts: Sequence[str],
                       prompt_format: str = "raw") -> torch.Tensor:
    """(hidden,): token embeddings summed over tokens and prompts, L2-normalised (mergekit)."""
    total = torch.zeros(embed.shape[1], dtype=torch.float32)
    for p in prompts:
        total += embed[torch.tensor(prompt_ids(tokenizer, p, prompt_format))].float().sum(0)
    return total / total.norm().clamp(min=1e-8)


def _normalise(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def compute_gates(mode: str, experts: Sequence, num_layers: int, hidden_size: int, *,
                  model=None, tokenizer=None, embed: Optional[torch.Tensor] = None,
                  prompt_format: str = "raw", seed: int = 0) -> torch.Tensor:
    """Gate rows for `experts` (objects with positive_prompts / negative_prompts lists)."""
    n = len(experts)
    gen = torch.Generator().manual_seed(seed)
    if mode == "random":
        return torch.randn((num_layers, n, hidden_size), generator=gen)
    if mode == "uniform_random":
        bound = 1.0 / hidden_size ** 0.5
        return (torch.rand((num_layers, n, hidden_size), generator=gen) * 2 - 1) * bound
    rows = []
    for e in experts:
        if mode == "hidden":
            v = hidden_vector(model, tokenizer, e.positive_prompts, prompt_format)
            if e.negative_prompts:
                v = v - hidden_vector(model, tokenizer, e.negative_prompts, prompt_format)
            rows.append(_normalise(v))
        elif mode == "cheap_embed":
            v = cheap_embed_vector(embed, tokenizer, e.positive_prompts, prompt_format)
            if e.negative_prompts:
                v = v - cheap_embed_vector(embed, tokenizer, e.negative_prompts, prompt_format)
            rows.append(_normalise(v).expand(num_layers, -1))
        else:
            raise UsageError(f"unknown gate_mode '{mode}'")
    return torch.stack(rows, dim=1).contiguous()  # (layers, experts, hidden)


def parallel_pairs(gates: torch.Tensor, threshold: float = PARALLEL_COS) -> list[tuple[int, int, list[int], float]]:
    """(expert i, expert j, layers, max cos) for every pair whose rows are nearly parallel."""
    g = _normalise(gates.float())
    cos = g @ g.transpose(1, 2)  # (layers, experts, experts)
    found = []
    n = gates.shape[1]
    for i in range(n):
        for j in range(i + 1, n):
            layers = [int(l) for l in torch.nonzero(cos[:, i, j] > threshold).flatten()]
            if layers:
                found.append((i, j, layers, float(cos[:, i, j].max())))
    return found


def warn_parallel(gates: torch.Tensor, names: Sequence[str], threshold: float = PARALLEL_COS) -> list[str]:
    """Log (and return) one warning per nearly parallel pair: those experts will be routed alike."""
    msgs = []
    for i, j, layers, mx in parallel_pairs(gates, threshold):
        where = "all layers" if len(layers) == gates.shape[0] else f"layers {layers}"
        msgs.append(f"experts {i} ({names[i]}) and {j} ({names[j]}) have nearly parallel gate rows in "
                    f"{where} (cos up to {mx:.3f}): their prompts are too similar to route apart")
    for m in msgs:
        log.warning(m)
    return msgs
