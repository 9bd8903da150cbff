"""Router (gate) initialisation for an assembled MoE, with mergekit-moe's semantics.

Every mode returns a tensor of shape (num_layers, num_experts, hidden_size): row e of layer l is
the router weight of expert e in layer l (Mixtral's `mlp.gate.weight[l]`).

* hidden: for each layer l, the residual-stream hidden state *entering* layer l
  (`output_hidden_states[l]`) at the last token of each prompt (raw format; with the chat format:
  averaged over the prompt's own tokens, see below), averaged over the expert's positive prompts,
  minus the same average over its negative prompts, L2-normalised per layer.
* hidden_last, hidden_avg (mergekit's names for its two hidden modes): the same, at the last gate
  position of each prompt (hidden_last; mergekit's `hidden`) or averaged over all of them
  (hidden_avg; with the raw format every token of the prompt, bos included). `hidden` is
  hidden_last with the raw format and hidden_avg with the chat format (see below).
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

Why chat prompts do not use the last token: every chat-rendered prompt ends in the same template
tokens ("<|im_start|>assistant\n"), so layer 0's input there is the same embedding for every
prompt and positive minus negative is exactly zero (uniform routing in layer 0); in the next layers
it is dominated by the template as well. So with `prompt_format: chat` the hidden state is averaged
over the positions of the prompt's own text inside the rendered template (the user content), which
differs between experts in every layer. A row whose positive-minus-negative difference vanishes
(below ZERO_REL of the positive vector) is set to exactly zero and reported by `warn_gates`, like
nearly parallel rows: such an expert is never preferred in that layer.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import torch

from finetune.errors import UsageError

log = logging.getLogger(__name__)

HIDDEN_MODES = ("hidden", "hidden_avg", "hidden_last")  # the base runs the prompts (mergekit accepts all three)

PARALLEL_COS = 0.95  # gate rows closer than this route their experts alike
ZERO_REL = 1e-4  # a difference this small against the positive vector is rounding, not signal


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


def own_positions(tokenizer, prompt: str, prompt_format: str, num_ids: int, mode: str = "hidden") -> list[int]:
    """Positions whose hidden states make a prompt's gate vector: the last one (raw), or those of
    the prompt's own text inside the chat template (chat; all positions if the template rewrote it).
    hidden_last keeps only the last of these, hidden_avg all of them (raw: every token)."""
    if prompt_format != "chat":
        return list(range(num_ids)) if mode == "hidden_avg" else [num_ids - 1]
    if mode == "hidden_last":
        return own_positions(tokenizer, prompt, prompt_format, num_ids)[-1:]
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    at = text.rfind(prompt)
    if at < 0 or not prompt:
        return list(range(num_ids))
    def count(t):
        return len(tokenizer(t, add_special_tokens=False)["input_ids"]) if t else 0
    start, end = count(text[:at]), min(count(text[:at + len(prompt)]), num_ids)
    return list(range(start, end)) if end > start else list(range(num_ids))


@torch.no_grad()
def hidden_vector(model, tokenizer, prompts: Sequence[str], prompt_format: str = "raw",
                  mode: str = "hidden") -> torch.Tensor:
    """(num_layers, hidden): mean over prompts of each layer's input hidden state at the prompt's
    gate positions (`own_positions`)."""
    device = next(model.parameters()).device
    acc = None
    for p in prompts:
        ids = prompt_ids(tokenizer, p, prompt_format)
        pos = own_positions(tokenizer, p, prompt_format, len(ids), mode)
        out = model(input_ids=torch.tensor([ids], device=device), output_hidden_states=True, use_cache=False)
        # hidden_states[0] is the embedding output = input of layer 0; the last entry is after
        # the final norm and feeds no layer, so it is dropped (as mergekit does).
        h = torch.stack([hs[0, pos].float().mean(0).cpu() for hs in out.hidden_states[:-1]])
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
        # mergekit's arithmetic, in its order (r * 2 * s - s, s = sqrt(1 / hidden)): bit for bit
        scale = math.sqrt(1.0 / hidden_size)
        return torch.rand((num_layers, n, hidden_size), generator=gen) * 2 * scale - scale
    rows = []
    for e in experts:
        if mode in HIDDEN_MODES:
            pos = hidden_vector(model, tokenizer, e.positive_prompts, prompt_format, mode)
            v = pos - hidden_vector(model, tokenizer, e.negative_prompts, prompt_format, mode) \
                if e.negative_prompts else pos
            zero = v.norm(dim=-1) <= ZERO_REL * pos.norm(dim=-1)
            rows.append(torch.where(zero[:, None], torch.zeros_like(v), _normalise(v)))
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


def zero_rows(gates: torch.Tensor) -> list[tuple[int, list[int]]]:
    """(expert, layers) for every expert whose gate row is zero in some layers."""
    zero = gates.float().norm(dim=-1) == 0  # (layers, experts)
    return [(e, [int(l) for l in torch.nonzero(zero[:, e]).flatten()]) for e in range(gates.shape[1])
            if bool(zero[:, e].any())]


def warn_gates(gates: torch.Tensor, names: Sequence[str], threshold: float = PARALLEL_COS) -> list[str]:
    """`warn_parallel`, plus one warning per expert whose gate row is zero in some layers."""
    msgs = warn_parallel(gates, names, threshold)
    for e, layers in zero_rows(gates):
        where = "all layers" if len(layers) == gates.shape[0] else f"layers {layers}"
        msg = (f"expert {e} ({names[e]}) has a zero gate row in {where}: its positive and negative prompts "
               "give the same hidden state there (e.g. only the chat template's last token differs), so it is "
               "never preferred in those layers")
        log.warning(msg)
        msgs.append(msg)
    return msgs


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
