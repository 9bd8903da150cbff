"""The model-facing half of eval: batched loss, batched greedy generation, option log-likelihoods.

Generation batches prompts of similar length together (sorted, then restored) and pads on the
LEFT, so every row's last prompt token sits at the end and the KV cache of `generate` serves the
whole batch; with the attention mask and mask-derived positions this gives the same tokens as
generating one prompt at a time.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from finetune.data.pack import collate, single_units
from finetune.eval.suites import GenerationSpec
from finetune.progress import PlainLines, on_terminal

# End-of-turn markers of common chat templates: generation stops at any of them, not only at eos.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


class Progress:
    """Rows done in one phase of a task: tqdm's bar on a terminal; in a log (SLURM, a pipe) a plain
    line every few seconds, `[eval] alpaca generate: 40/100 rows  3.1 rows/s  eta 19s`."""

    def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = "rows", every_s: float = 10.0):
        live = enabled and on_terminal()
        self._bar = tqdm(total=total, desc=desc, unit="ex", leave=False, file=sys.stdout) if live else None
        self._lines = PlainLines(total, f"[eval] {desc}: ", unit, every_s=every_s) if enabled and not live else None
        self._done = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.close()

    def update(self, n: int) -> None:
        self._done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._lines is not None:
            self._lines.update(self._done)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def pad_id_of(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def stop_ids(model, tokenizer) -> list[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return sorted(ids)


@torch.no_grad()
def sequence_nll(model, sequences: Sequence[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 8,
                 desc: str = "loss", show: bool = True, unit: str = "rows") -> list[tuple[float, int]]:
    """Per sequence (summed negative log-likelihood of the labelled tokens, number of those tokens).

    Batches go through the training collator (finetune.data.pack.collate), so loss here is the loss
    training reports on the same tokens.

    Labels are -100 where a token is not scored (the training convention); the sum is taken in
    fp32 over the scored positions only, so full-vocabulary fp32 logits never exist for a batch.
    """
    device = _device(model)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    with Progress(len(sequences), desc, show, unit) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate(single_units([sequences[i] for i in idx]), pad_id)
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            # The training call: right padding, no attention mask, per-example position ids. The
            # last token is only ever a target, never an input: a window of exactly the model's
            # context length + 1 tokens (lm-eval's rolling windows) stays within its positions.
            logits = model(input_ids=ids[:, :-1], position_ids=batch["position_ids"][:, :-1].to(device),
                           use_cache=False).logits
            target = labels[:, 1:]
            keep = target != -100
            nll = torch.nn.functional.cross_entropy(logits[keep].float(), target[keep], reduction="none")
            per_row = torch.zeros(len(idx), device=device, dtype=torch.float32)
            per_row.index_add_(0, keep.nonzero()[:, 0], nll)
            counts = keep.sum(1)
            for row, i in enumerate(idx):
                out[i] = (float(per_row[row]), int(counts[row]))
            bar.update(len(idx))
    return out


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[list[int]], gen: GenerationSpec, desc: str = "generate",
             show: bool = True) -> list[str]:
    """Completions for tokenized prompts, batched with left padding (greedy unless do_sample)."""
    device = _device(model)
    pad_id = pad_id_of(tokenizer)
    eos = stop_ids(model, tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: list[Optional[str]] = [None] * len(prompts)
    kwargs = dict(max_new_tokens=gen.max_new_tokens, pad_token_id=pad_id, eos_token_id=eos, do_sample=gen.do_sample)
    if gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p)
        torch.manual_seed(gen.seed)
    else:
        # Unset sampling knobs a checkpoint's generation_config may carry, so greedy stays greedy
        # without warnings.
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with Progress(len(prompts), desc, show) as bar:
        for start in range(0, len(order), gen.batch_size):
            idx = order[start:start + gen.batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                p = prompts[i]
                ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[row, width - len(p):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            for row, i in enumerate(idx):
                new = out[row, width:].tolist()
                texts[i] = cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), gen.stop)
            bar.update(len(idx))
    return [t or "" for t in texts]


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    for s in stop:
        if s and s in text:
            text = text[:text.index(s)]
    return text.strip()


def pair_logprobs(model, tokenizer, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 8,
                  show: bool = True, desc: str = "choices", unit: str = "options") -> list[tuple[float, int]]:
    """(log-likelihood, token count) of each continuation's tokens right after its context: the
    one scoring of prompt + continuation that multiple choice, plain-text loss, rolling perplexity
    and preference pairs all use."""
    seqs = [(list(c) + list(o), [-100] * len(c) + list(o)) for c, o in pairs]
    nll = sequence_nll(model, seqs, pad_id_of(tokenizer), batch_size, desc=desc, show=show, unit=unit)
    return [(-s, n) for s, n in nll]


def choice_logprobs(model, tokenizer, prompts: Sequence[list[int]], choices: Sequence[Sequence[str]],
                    batch_size: int = 8, show: bool = True, desc: str = "choices") -> list[list[float]]:
    """Log-likelihood of each option's tokens right after its (chat-template) prompt, per example."""
    pairs, owner = [], []
    for i, (p, opts) in enumerate(zip(prompts, choices)):
        for opt in opts:
            pairs.append((list(p), tokenizer.encode(opt, add_special_tokens=False)))
            owner.append(i)
    out: list[list[float]] = [[] for _ in prompts]
    for i, (ll, _) in zip(owner, pair_logprobs(model, tokenizer, pairs, batch_size, show, desc)):
        out[i].append(ll)
    return out
