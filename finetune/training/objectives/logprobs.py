"""Per-sequence log-probabilities of responses: the quantity every preference objective (and the
preference eval suite) is built on.

A sequence is (prompt_ids, response_ids). Its log-prob is the sum of log p(token | everything
before it) over the response tokens, in fp32, and its count is how many tokens that sum has.
Sequences are laid out in rows of one forward (`sequence_rows`): one per row, or packed several to
a row with position ids restarting at 0 for each (attention_mask=None + restarting position ids
= block-diagonal attention in transformers 5, see finetune.data.pack), so the sums are the same
either way (tests/training/objectives/test_logprobs.py checks packed against unpacked).

`seq_index` says, for every input position, which sequence's counted response token sits there
(-1: prompt, padding, or a response token at a segment's first position, which has no context to
be predicted from). The sums are formed through training's own head path
(finetune.training.loss): chunk=0 runs the model's head over every position; chunk>0 runs the
head over counted positions only, `chunk` rows at a time, one sequence at a time, so full logits
never exist and d loss / d hidden is all a frozen head keeps.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from finetune.data.pack import best_fit_bins
from finetune.training.loss import head_loss_sum, model_outputs, unwrap

Seq = tuple[Sequence[int], Sequence[int]]  # (prompt_ids, response_ids)


def sequence_rows(seqs: Sequence[Seq], pad_id: int, pack: bool = False) -> dict[str, torch.Tensor]:
    """Lay `seqs` out for one forward: {"input_ids", "position_ids", "seq_index"} LongTensors [R, L].

    L is the longest sequence. pack=False: one sequence per row (R = len(seqs)); pack=True: best-fit
    into rows of L tokens, used only where that needs fewer rows (it never needs more). Padding
    is a segment of its own (position ids restarting), with seq_index -1.
    """
    lengths = [len(p) + len(r) for p, r in seqs]
    if not lengths:
        raise ValueError("sequence_rows needs at least one sequence")
    L = max(lengths)
    rows = [[i] for i in range(len(seqs))]
    if pack:
        bins = best_fit_bins(lengths, L)
        if len(bins) < len(rows):
            rows = [sorted(b) for b in bins]
    R = len(rows)
    input_ids = torch.full((R, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, L), dtype=torch.long)
    seq_index = torch.full((R, L), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            prompt, response = seqs[i]
            n, k = lengths[i], len(prompt)
            input_ids[r, at:at + n] = torch.as_tensor(list(prompt) + list(response), dtype=torch.long)
            position_ids[r, at:at + n] = torch.arange(n)
            seq_index[r, at + max(k, 1):at + n] = i  # position 0 of a segment is predicted from nothing
            at += n
        if at < L:
            position_ids[r, at:] = torch.arange(L - at)
    return {"input_ids": input_ids, "position_ids": position_ids, "seq_index": seq_index}


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                   seq_index: torch.Tensor, n_seqs: int, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums, counts): per sequence 0..n_seqs-1, the fp32 sum of log p over its counted tokens
    (seq_index as `sequence_rows` gives it) and how many there are. Differentiable through `model`
    when grad is enabled."""
    targets = input_ids[:, 1:]
    seg = seq_index[:, 1:]  # position t predicts token t + 1
    keep = seg >= 0
    device = input_ids.device
    counts = torch.zeros(n_seqs, dtype=torch.long, device=device).index_add_(0, seg[keep], torch.ones_like(seg[keep]))
    if not chunk:
        out = model_outputs(model, input_ids, position_ids, with_head=True)
        logits = out.logits[:, :-1][keep].float()
        token_logps = -F.cross_entropy(logits, targets[keep], reduction="none")
        sums = torch.zeros(n_seqs, dtype=torch.float32, device=device).index_add(0, seg[keep], token_logps)
        return sums, counts
    out = model_outputs(model, input_ids, position_ids, with_head=False)
    hidden = out.last_hidden_state[:, :-1][keep]
    flat_seg, flat_targets = seg[keep], targets[keep]
    head = unwrap(model).get_output_embeddings()
    parts = []
    for i in range(n_seqs):  # one sequence at a time: each sum gets its own gradient weight
        rows = (flat_seg == i).nonzero(as_tuple=True)[0]
        if len(rows):
            parts.append(-head_loss_sum(head, hidden[rows], flat_targets[rows], chunk).float())
        else:
            parts.append(hidden.new_zeros((), dtype=torch.float32))
    return torch.stack(parts), counts


def response_logps(model: nn.Module, seqs: Sequence[Seq], pad_id: int, pack: bool = True,
                   chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums, counts) of `seqs` in one forward of `model` (on its device): for scoring, e.g. held-out
    pairs in an eval suite. Runs under whatever grad mode the caller is in."""
    device = next(model.parameters()).device
    rows = {k: v.to(device) for k, v in sequence_rows(seqs, pad_id, pack=pack).items()}
    return sequence_logps(model, rows["input_ids"], rows["position_ids"], rows["seq_index"], len(seqs), chunk)
