"""Preference data: rows -> pairs (DPO, ORPO, SimPO) or labelled answers (KTO) as token ids, with
drops counted by reason, split and cached the way SFT data is (finetune.data.pipeline).

    from finetune.data.preference import prepare_preference
    bundle = prepare_preference(cfg.data, tokenizer, paired=True, seed=cfg.train.seed)

Units (plain dicts of int lists; the objective collates them):
    paired:   {"prompt_ids", "chosen_ids", "rejected_ids"}
    unpaired: {"prompt_ids", "completion_ids", "label"}
`prompt_ids` is the prompt conversation (system prompt, tools, earlier turns) rendered once through
the chat template (or prompt style), up to and including the assistant generation header. An
answer's ids are exactly the tokens SFT trains for that assistant turn (the content and its
end-of-turn token, never the separator after it): the prompt plus the answer is rendered as one
conversation, tokenized, and the answer's trained tokens taken (Renderer.render_answer), so the
two paths cannot disagree on what counts. A pair objective given unpaired feedback is refused; KTO
given pairs reads each as two answers (chosen desirable, rejected undesirable), as TRL does.

Length (data.seq_len): len(prompt) + max(len(chosen), len(rejected)) <= seq_len. The prompt is cut
from the left (its end, the question and the generation header, kept), only as far as the longer
answer needs, and never below half of seq_len: a long answer must not leave the model a prompt
too short to know what it answers (TRL keeps 512 of 1024 for the prompt by default). The answers
are then cut on the right. data.truncation=drop drops the pair instead (`too long`). Every cut
pair is counted (`truncated`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np

from finetune.data.formats import BadRow, Conversation
from finetune.data.pipeline import (
    PARALLEL_MIN,
    DataBundle,
    DataStats,
    _bar,
    _cache_dir,
    _drop_summary,
    _raise_strict,
    _split_indices,
    convert_rows,
    load_counted_rows,
    cache_key,
    get_renderer,
)
from finetune.data.preference_formats import (
    PrefExample,
    first_format,
    is_unpaired_row,
    pref_columns,
    to_preference,
)
from finetune.data.rows import Rows
from finetune.data.sources import load_rows, pin_revision, resolve
from finetune.data.tokenize import IGNORE, Renderer
from finetune.errors import UsageError
from finetune.fs import atomic_file

CODE_FILES = ("preference.py", "preference_formats.py")
SIDES = {True: ("chosen_ids", "rejected_ids"), False: ("completion_ids",)}


# ------------------------------------------------------------------------------ rows -> examples


def _convert(rows: Rows, idx, fmt: str, cols: dict, roles: dict, data_cfg, stats: DataStats,
             paired: bool) -> tuple[list[PrefExample], list[str]]:
    out, wheres = [], []
    for ex, where in convert_rows(rows, idx, lambda row, fixes: to_preference(
            row, fmt, cols, roles, data_cfg.system_prompt, fixes), data_cfg, stats):
        parts = [ex] if paired else ex.unpaired()
        out += parts
        wheres += [where] * len(parts)
    return out, wheres


def _format(data_cfg, src, rows: Rows, paired: bool) -> tuple[str, dict]:
    # A card's format describes the card's rows: with data.path given instead (a recipe's card
    # replaced, e.g. tiny-lora's alpaca sample), only data.format is taken, else the rows tell.
    fmt = data_cfg.format or ("" if data_cfg.path else src.format) or first_format(rows.rows, src.name)
    cols = pref_columns(fmt, src.columns)
    first = next((r for r in rows.rows if isinstance(r, dict)), None)
    if paired and is_unpaired_row(first, fmt, cols):
        raise UsageError(f"{src.name}: dpo, orpo and simpo train on pairs (chosen and rejected), but these rows are "
                         f"unpaired feedback (an answer and its '{cols['label']}'): use train.objective=kto")
    return fmt, cols


def _load(data_cfg, seed: int, stats: DataStats, src, paired: bool):
    rows = load_counted_rows(src, data_cfg, stats)
    fmt, cols = _format(data_cfg, src, rows, paired)
    told = data_cfg.format or ("" if data_cfg.path else src.format)
    stats.notes.append(f"format {fmt}" + ("" if told else " (detected from the first row; data.format sets it)"))
    train_idx, val_idx = _split_indices(len(rows.rows), data_cfg, seed, bool(data_cfg.val_path))
    if data_cfg.strict:  # the first bad row in file order is the one to name
        _convert(rows, sorted(np.concatenate([train_idx, val_idx]).tolist()), fmt, cols, src.roles, data_cfg,
                 DataStats(), paired)
    train = _convert(rows, train_idx, fmt, cols, src.roles, data_cfg, stats, paired)
    if data_cfg.val_path:
        vsrc = resolve(data_cfg, val=True, need_format=False)
        vrows = load_rows(vsrc, strict=data_cfg.strict)
        for where, _ in vrows.broken:
            stats.drop("invalid JSON line", where)
        vfmt, vcols = _format(data_cfg, vsrc, vrows, paired) if vrows.rows else (fmt, cols)
        val = _convert(vrows, range(len(vrows.rows)), vfmt, vcols, vsrc.roles, data_cfg, stats, paired)
    else:
        val = _convert(rows, val_idx, fmt, cols, src.roles, data_cfg, stats, paired)
    return train, val


# ------------------------------------------------------------------------------ examples -> ids


def fit_lengths(prompt: list[int], answers: list[list[int]], seq_len: int, mode: str = "truncate"
                ) -> tuple[list[int], list[list[int]], bool]:
    """The length policy (module doc): (prompt, answers, whether anything was cut), or BadRow."""
    longest = max(len(a) for a in answers)
    if len(prompt) + longest <= seq_len:
        return prompt, answers, False
    if mode == "drop":
        raise BadRow("too long", "", f"{len(prompt)} prompt + {longest} answer tokens > seq_len {seq_len}")
    keep = min(len(prompt), max(seq_len - longest, seq_len // 2))
    room = seq_len - keep
    answers = [a[:room] for a in answers]
    if not all(answers):
        raise BadRow("answer empty after truncation", "", f"prompt of {len(prompt)} tokens, seq_len {seq_len}")
    return prompt[len(prompt) - keep:], answers, True


def encode_example(renderer: Renderer, ex: PrefExample) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, [ids of each answer that count]) of one example, before the length policy."""
    p = ex.prompt
    texts, spans = [renderer.prompt_text(p)], [[]]
    for answer in ex.answers():
        text, span = renderer.render_answer(Conversation(messages=[*p.messages, answer], system=p.system, tools=p.tools))
        texts.append(text)
        spans.append([span])
    enc = renderer.encode(texts, spans, as_numpy=True)
    answers = [ids[labels != IGNORE].tolist() for ids, labels in enc[1:]]
    if not all(answers):
        raise BadRow("answer renders no tokens", "", "the template emits nothing to count for it")
    return enc[0][0].tolist(), answers


def _encode_all(examples: list[PrefExample], wheres: list[str], renderer: Renderer, data_cfg, stats: DataStats,
                paired: bool, progress: bool, what: str) -> list[dict]:
    units = []
    with _bar(progress and len(examples) >= PARALLEL_MIN, f"tokenize {what}", len(examples)) as (prog, task):
        for ex, where in zip(examples, wheres):
            if prog is not None:
                prog.advance(task, 1)
            try:
                prompt, answers = encode_example(renderer, ex)
                prompt, answers, cut = fit_lengths(prompt, answers, data_cfg.seq_len, data_cfg.truncation)
            except BadRow as e:
                if data_cfg.strict:
                    _raise_strict(where, e)
                stats.drop(e.reason, where)
                continue
            stats.truncated += cut
            unit = {"prompt_ids": prompt, **dict(zip(SIDES[paired], answers))}
            if not paired:
                unit["label"] = bool(ex.label)
            units.append(unit)
    return units


def _summarise(stats: DataStats, train: list[dict], val: list[dict], paired: bool) -> None:
    sides = SIDES[paired]
    stats.examples, stats.val_examples, stats.units = len(train), len(val), len(train)
    stats.trained_tokens = sum(len(u[s]) for u in train for s in sides)
    stats.tokens = stats.trained_tokens + sum(len(u["prompt_ids"]) for u in train)
    mean = lambda key: sum(len(u[key]) for u in train) / max(1, len(train))  # noqa: E731
    stats.extra = {"prompt tokens": f"{mean('prompt_ids'):.1f} per {stats.kind[:-1]} (context, not counted)"}
    for s in sides:
        stats.extra[f"{s[:-4]} tokens"] = f"{mean(s):.1f} per {stats.kind[:-1]} (counted)"
    if not paired:
        good = sum(u["label"] for u in train)
        stats.extra["labels"] = f"{good:,} desirable, {len(train) - good:,} undesirable"


# ------------------------------------------------------------------------------ cache


def _fingerprint(data_cfg, tokenizer, seed: int, src, paired: bool) -> str:
    h = hashlib.sha256(cache_key(data_cfg, tokenizer, seed, src).encode())
    h.update(b"paired" if paired else b"unpaired")
    for name in CODE_FILES:
        h.update((Path(__file__).parent / name).read_bytes())
    return "pref-" + h.hexdigest()[:32]


def _flat(units: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    seqs = [u[key] for u in units]
    ids = np.fromiter((t for s in seqs for t in s), dtype=np.int32)
    return ids, np.asarray([len(s) for s in seqs], dtype=np.int64)


def _save(path: Path, bundle: DataBundle, paired: bool) -> None:
    arrays = {"stats": np.frombuffer(json.dumps(dataclasses.asdict(bundle.stats)).encode(), dtype=np.uint8)}
    for name, units in (("train", bundle.train), ("val", bundle.val)):
        for key in ("prompt_ids", *SIDES[paired]):
            arrays[f"{name}_{key}"], arrays[f"{name}_{key}_lens"] = _flat(units, key)
        if not paired:
            arrays[f"{name}_label"] = np.asarray([u["label"] for u in units], dtype=bool)
    with atomic_file(path) as f:
        np.savez(f, **arrays)


def _load_cache(path: Path, paired: bool) -> Optional[DataBundle]:
    try:
        with np.load(path) as z:
            stats = DataStats(**json.loads(bytes(z["stats"]).decode()))
            split = {}
            for name in ("train", "val"):
                cols = {}
                for key in ("prompt_ids", *SIDES[paired]):
                    ids, lens = z[f"{name}_{key}"], z[f"{name}_{key}_lens"]
                    cols[key] = [a.tolist() for a in np.split(ids, np.cumsum(lens)[:-1])] if len(lens) else []
                if not paired:
                    cols["label"] = z[f"{name}_label"].tolist()
                split[name] = [dict(zip(cols, vals)) for vals in zip(*cols.values())]
    except Exception:  # a truncated or foreign file is a cache miss
        return None
    stats.cached = True
    return DataBundle(split["train"], split["val"], stats)


# ------------------------------------------------------------------------------ prepare


def prepare_preference(data_cfg, tokenizer, *, paired: bool, seed: int, progress: bool = True) -> DataBundle:
    """Load, convert, split, tokenize and cut the preference data of `data_cfg` (cached): units as
    in the module doc, the train/val split as SFT's (data.val_path or data.val_fraction)."""
    t0 = time.perf_counter()
    if data_cfg.train_on_prompt:
        raise UsageError("data.train_on_prompt=true: preference objectives count only the answers' tokens "
                         "(the prompt is shared by both sides); leave it false")
    renderer = get_renderer(tokenizer, data_cfg)  # checks pad != eos and the prompt style first
    src = resolve(data_cfg, need_format=False)
    note = pin_revision(src)
    path = None
    if data_cfg.cache:
        path = _cache_dir() / f"{_fingerprint(data_cfg, tokenizer, seed, src, paired)}.npz"
        if path.is_file():
            hit = _load_cache(path, paired)
            if hit is not None:
                hit.stats.seconds = time.perf_counter() - t0
                return hit
    stats = DataStats(seq_len=data_cfg.seq_len, notes=[note] if note else [], kind="pairs" if paired else "answers")
    (train_x, train_w), (val_x, val_w) = _load(data_cfg, seed, stats, src, paired)
    if not train_x:
        raise UsageError(f"{src.name}: no usable rows after filtering ({_drop_summary(stats)})")
    whole = [Conversation(messages=[*x.prompt.messages, *x.answers()], system=x.prompt.system, tools=x.prompt.tools)
             for x in train_x + val_x]
    tooled = [c for c in whole if c.tools or any(m.get("tool_calls") for m in c.messages)]
    stats.tool_rows, stats.tool_fallback = len(tooled), sum(map(renderer.tool_fallback, tooled))
    train = _encode_all(train_x, train_w, renderer, data_cfg, stats, paired, progress, "train")
    val = _encode_all(val_x, val_w, renderer, data_cfg, stats, paired, progress, "val")
    if not train:
        raise UsageError(f"{src.name}: no usable {stats.kind} after tokenization ({_drop_summary(stats)})")
    _summarise(stats, train, val, paired)
    bundle = DataBundle(train, val, stats)
    if path is not None:
        try:
            _save(path, bundle, paired)
        except OSError:  # a read-only cache must not stop training
            pass
    stats.seconds = time.perf_counter() - t0
    return bundle
