"""rows -> conversations -> (input_ids, labels) -> packed units, with counts and a cache.

`prepare` is what training calls. Order of operations, all deterministic given the seed:
load rows; shuffle row indices (numpy, seeded); keep `max_rows`; hold out the validation rows
(or read `val_path`); convert rows with the format adapter (bad rows counted by reason);
render + tokenize + mask (in a process pool when large); apply the length policy; pack.
The result is cached under cache_root()/data/ keyed by the data's content hash (or hub id +
resolved revision), the tokenizer (vocab + specials), the template or prompt style actually used,
a hash of this package's code, and every setting that changes the output.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from finetune.data.formats import BadRow, Conversation, columns_for, to_conversation
from finetune.data.pack import PackedUnits, packing_efficiency
from finetune.data.rows import Rows
from finetune.data.sources import Source, load_rows, pin_revision, read_card, resolve
from finetune.data.tokenize import IGNORE, Renderer, use_chat_template
from finetune.errors import UsageError
from finetune.fs import atomic_file, cache_root
from finetune.progress import doing

CACHE_VERSION = "2"
CODE_FILES = ("formats.py", "styles.py", "templates.py", "tokenize.py", "pack.py", "sources.py", "pipeline.py")
CHUNK = 2000            # conversations per tokenization task
PARALLEL_MIN = 4000     # below this many conversations a process pool costs more than it saves


@dataclass
class DataStats:
    rows_loaded: int = 0
    dropped: dict = field(default_factory=dict)      # reason -> count (rows and examples)
    first_where: dict = field(default_factory=dict)  # reason -> where it first happened
    fixed: dict = field(default_factory=dict)        # repair -> count (rows kept)
    examples: int = 0
    val_examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    units: int = 0
    seq_len: int = 0
    packing_efficiency: float = 0.0
    source: str = ""
    files: list = field(default_factory=list)        # the files read, for a local source
    notes: list = field(default_factory=list)        # e.g. which hub revision was read
    tool_rows: int = 0                               # examples with tools or tool calls
    tool_fallback: int = 0                           # ... rendered by the fallback, not the template
    cached: bool = False
    seconds: float = 0.0
    kind: str = "examples"                           # what a unit is: examples (SFT), pairs, feedback (KTO)
    extra: dict = field(default_factory=dict)        # label -> value: rows the kind adds (preference data)
    sources: list = field(default_factory=list)      # data.sources: one dict per source (finetune.data.mix)

    @property
    def trained_fraction(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def drop(self, reason: str, where: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n
        self.first_where.setdefault(reason, where)

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs: the statistics table."""
        out = [("source", self.source)]
        for i, s in enumerate(self.sources):
            out.append((f"  source {i + 1}", f"{s['source']}: weight {s['weight']:g}, {s['rows']:,} rows "
                        f"({s['dropped']:,} dropped), {s['examples']:,} train examples -> {s['used']:,} in the mix, "
                        f"{s['trained_share']:.1%} of trained tokens" + (" (cached)" if s["cached"] else "")))
        if self.files and (len(self.files) > 1 or self.files[0] != self.source):
            more = f" (+{len(self.files) - 5} more)" if len(self.files) > 5 else ""
            out.append(("files read", ", ".join(self.files[:5]) + more))
        out += [("note", n) for n in self.notes]
        out += [("rows loaded", f"{self.rows_loaded:,}"), ("rows dropped", f"{self.dropped_total:,}")]
        for reason, n in sorted(self.dropped.items(), key=lambda kv: -kv[1]):
            where = self.first_where.get(reason)
            out.append((f"  {reason}", f"{n:,}" + (f"  (first: {where})" if where else "")))
        for fix, n in sorted(self.fixed.items()):
            out.append((f"  {fix}", f"{n:,} (kept)"))
        out += [(f"train {self.kind}", f"{self.examples:,}"), (f"val {self.kind}", f"{self.val_examples:,}"),
                ("tokens", f"{self.tokens:,}"),
                ("trained tokens", f"{self.trained_tokens:,} ({self.trained_fraction:.1%})"),
                ("truncated", f"{self.truncated:,} (seq_len {self.seq_len})")]
        if self.tool_rows:
            out.append(("tool use", f"{self.tool_rows:,} examples, " + (
                f"{self.tool_fallback:,} by the fallback (tools in the system prompt, calls as JSON text: "
                "the template has no tool support)" if self.tool_fallback else "all in the template's own format")))
        out += list(self.extra.items())
        if self.kind == "examples":  # preference units are pairs or answers, batched by the objective
            out += [("units", f"{self.units:,}"), ("packing efficiency", f"{self.packing_efficiency:.1%}")]
        return out

    def lines(self) -> list[str]:
        width = max(len(k) for k, _ in self.rows())
        return [f"{k:<{width}}  {v}" for k, v in self.rows()]

    def __str__(self) -> str:
        return "\n".join(self.lines())


@dataclass
class DataBundle:
    train: PackedUnits  # a sequence of unit dicts (see finetune.data.pack)
    val: PackedUnits
    stats: DataStats


# ------------------------------------------------------------------------------ conversations


def _raise_strict(where: str, e: BadRow) -> None:
    field_part = f" field '{e.field}'" if e.field else ""
    raise UsageError(f"{where}:{field_part} {e.reason}{': ' + e.detail if e.detail else ''} (data.strict=true)")


def convert_rows(rows: Rows, idx: Sequence[int], convert, data_cfg, stats: DataStats):
    """(convert(row, fixes), where) for each row of `idx`; a BadRow is dropped with its counted reason
    (refused with data.strict=true) and the fixes applied are counted. SFT conversations and
    preference pairs are read through this one rule."""
    for i in idx:
        fixes: list[str] = []
        try:
            result = convert(rows.rows[i], fixes)
        except BadRow as e:
            if data_cfg.strict:
                _raise_strict(rows.where[i], e)
            stats.drop(e.reason, rows.where[i])
            continue
        for f in fixes:
            stats.fixed[f] = stats.fixed.get(f, 0) + 1
        yield result, rows.where[i]


def _convert(rows: Rows, idx: Sequence[int], src: Source, data_cfg, stats: DataStats) -> tuple[list, list]:
    cols = columns_for(src.format, src.columns)
    done = list(convert_rows(rows, idx, lambda row, fixes: to_conversation(
        row, src.format, cols, src.roles, data_cfg.system_prompt, fixes), data_cfg, stats))
    return [c for c, _ in done], [w for _, w in done]


def _split_indices(n: int, data_cfg, seed: int, has_val_file: bool) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    if data_cfg.max_rows is not None:
        order = order[:max(0, int(data_cfg.max_rows))]
    if has_val_file or data_cfg.val_fraction <= 0 or len(order) < 2:
        return order, order[:0]
    n_val = min(len(order) - 1, max(1, int(round(len(order) * data_cfg.val_fraction))))
    return order[n_val:], order[:n_val]


def load_counted_rows(src: Source, data_cfg, stats: DataStats) -> Rows:
    """The source's rows, counted in `stats` (broken JSON lines dropped with their reason); an empty
    dataset is refused. SFT and preference data load through this."""
    stats.source, stats.files = src.name, [str(f) for f in src.files]
    rows = load_rows(src, strict=data_cfg.strict)
    stats.rows_loaded = len(rows.rows) + len(rows.broken)
    for where, _ in rows.broken:
        stats.drop("invalid JSON line", where)
    if not rows.rows:
        raise UsageError(f"{src.name}: the dataset is empty (no rows{', only broken lines' if rows.broken else ''})")
    return rows


def _load(data_cfg, seed: int, stats: DataStats, src: Optional[Source] = None):
    src = src or resolve(data_cfg)
    rows = load_counted_rows(src, data_cfg, stats)
    train_idx, val_idx = _split_indices(len(rows.rows), data_cfg, seed, bool(data_cfg.val_path))
    if data_cfg.strict:  # the first bad row in file order is the one to name, not the first after shuffling
        _convert(rows, sorted(np.concatenate([train_idx, val_idx]).tolist()), src, data_cfg, DataStats())
    train, train_where = _convert(rows, train_idx, src, data_cfg, stats)
    if data_cfg.val_path:
        vsrc = resolve(data_cfg, val=True)
        vrows = load_rows(vsrc, strict=data_cfg.strict)
        for where, _ in vrows.broken:
            stats.drop("invalid JSON line", where)
        val, val_where = _convert(vrows, range(len(vrows.rows)), vsrc, data_cfg, stats)
    else:
        val, val_where = _convert(rows, val_idx, src, data_cfg, stats)
    return src, train, train_where, val, val_where


def load_conversations(data_cfg, seed: int = 0, split: str = "train") -> tuple[list[Conversation], DataStats]:
    """Conversations of the train (or 'val', or 'all') split, with load/drop statistics."""
    stats = DataStats(seq_len=data_cfg.seq_len)
    _, train, _, val, _ = _load(data_cfg, seed, stats)
    convs = {"train": train, "val": val, "all": train + val}[split]
    if not convs:
        raise UsageError(f"{stats.source}: no usable rows after filtering ({_drop_summary(stats)})")
    return convs, stats


def _drop_summary(stats: DataStats) -> str:
    return ", ".join(f"{r}: {n}" for r, n in stats.dropped.items()) or "nothing dropped"


# ------------------------------------------------------------------------------ tokenization

_RENDERERS: dict = {}
_WORKER: dict = {}


def get_renderer(tokenizer, data_cfg) -> Renderer:
    """The renderer of `tokenizer` under data_cfg; data.chat_template is set on the tokenizer
    first (so the tokenizer saved with the adapter has it). Memoised per tokenizer object and
    template text: a tokenizer whose chat_template changes gets a new renderer."""
    use_chat_template(tokenizer, getattr(data_cfg, "chat_template", None), data_cfg.prompt_style)
    key = (id(tokenizer), json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True),
           data_cfg.prompt_style, data_cfg.train_on_prompt)
    hit = _RENDERERS.get(key)
    if hit is None or hit.tokenizer is not tokenizer:
        hit = _RENDERERS[key] = Renderer(tokenizer, data_cfg.prompt_style, data_cfg.train_on_prompt)
    return hit


def tokenize_conversation(conv: Conversation, tokenizer, data_cfg) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation, before the length policy."""
    return get_renderer(tokenizer, data_cfg).tokenize(conv)


def render_prompt(conv_or_messages, tokenizer, data_cfg) -> list[int]:
    """Token ids of the prompt up to and including the assistant generation header."""
    r = get_renderer(tokenizer, data_cfg)
    text = r.prompt_text(conv_or_messages)
    if r.backend is not None:
        return r.backend.encode(text, add_special_tokens=False).ids
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _tokenize_chunk(task):
    """Worker: conversations -> flat ids/labels arrays + lengths, and (index, BadRow) failures."""
    convs, seq_len, truncation = task
    r: Renderer = _WORKER["renderer"]
    texts, spans, ok_idx, failed = [], [], [], []
    for i, conv in enumerate(convs):
        try:
            t, s = r.render(conv)
        except BadRow as e:
            failed.append((i, e))
            continue
        texts.append(t)
        spans.append(s)
        ok_idx.append(i)
    ids_parts, lab_parts, lens, kept, truncated = [], [], [], [], 0
    for i, (ids, labels) in zip(ok_idx, r.encode(texts, spans, as_numpy=True)):
        cut = len(ids) > seq_len
        if cut:
            if truncation == "drop":
                failed.append((i, BadRow("too long", "", f"{len(ids)} tokens > seq_len {seq_len}")))
                continue
            ids, labels = ids[:seq_len], labels[:seq_len]
        if not (labels != IGNORE).any():
            failed.append((i, BadRow("no trained tokens after truncation" if cut else "no trained tokens")))
            continue
        truncated += cut
        ids_parts.append(ids)
        lab_parts.append(labels)
        lens.append(len(ids))
        kept.append(i)
    cat = (lambda parts: np.concatenate(parts).astype(np.int32)) if ids_parts else (lambda parts: np.zeros(0, np.int32))
    return cat(ids_parts), cat(lab_parts), np.asarray(lens, np.int64), kept, failed, truncated


def _tokenize_all(convs: list, wheres: list, renderer: Renderer, data_cfg, stats: DataStats,
                  progress: bool, what: str):
    """-> flat (ids, labels) int32 arrays of the kept examples, and their lengths."""
    _WORKER["renderer"] = renderer
    tasks = [(convs[i:i + CHUNK], data_cfg.seq_len, data_cfg.truncation) for i in range(0, len(convs), CHUNK)]
    nproc = min(data_cfg.num_proc or os.cpu_count() or 1, len(tasks))
    results = []
    bar = _bar(progress and len(convs) >= PARALLEL_MIN, f"tokenize {what}", len(convs))
    with bar as (prog, task_id):
        def done(res, n):
            results.append(res)
            if prog is not None:
                prog.advance(task_id, n)

        if nproc > 1 and len(convs) >= PARALLEL_MIN and "fork" in mp.get_all_start_methods():
            old = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism; avoid fork warnings
            try:
                with mp.get_context("fork").Pool(nproc) as pool:
                    for res, t in zip(pool.imap(_tokenize_chunk, tasks), tasks):
                        done(res, len(t[0]))
            finally:
                if old is None:
                    os.environ.pop("TOKENIZERS_PARALLELISM", None)
                else:
                    os.environ["TOKENIZERS_PARALLELISM"] = old
        else:
            for t in tasks:
                done(_tokenize_chunk(t), len(t[0]))
    for c, (_, _, _, _, failed, truncated) in enumerate(results):
        for i, e in sorted(failed, key=lambda f: f[0]):
            if data_cfg.strict:
                _raise_strict(wheres[c * CHUNK + i], e)
            stats.drop(e.reason, wheres[c * CHUNK + i])
        stats.truncated += truncated
    if not results:
        return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int64)
    return (np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results]),
            np.concatenate([r[2] for r in results]))


class _bar:
    """A rich progress bar when enabled, else a no-op context yielding (None, None)."""

    def __init__(self, enabled: bool, desc: str, total: int):
        self.enabled, self.desc, self.total, self.p = enabled, desc, total, None

    def __enter__(self):
        if not self.enabled:
            return None, None
        self.p = Progress(TextColumn(f"[bold]{self.desc}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          transient=True)
        self.p.__enter__()
        return self.p, self.p.add_task(self.desc, total=self.total)

    def __exit__(self, *exc):
        if self.p is not None:
            self.p.__exit__(*exc)


# ------------------------------------------------------------------------------ cache


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None
             else json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([type(tokenizer).__name__, getattr(tokenizer, "chat_template", None),
                         tokenizer.special_tokens_map, tokenizer.pad_token_id, tokenizer.eos_token_id,
                         tokenizer.bos_token_id], sort_keys=True, default=str).encode())
    return h.hexdigest()


@functools.lru_cache(None)
def code_fingerprint() -> str:
    """A hash of the data code: a change to how rows are read, rendered or packed is a cache miss
    without anyone remembering to bump CACHE_VERSION."""
    h = hashlib.sha256()
    for name in CODE_FILES:
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()


def cache_key(data_cfg, tokenizer, seed: int, src: Optional[Source] = None) -> str:
    src = src or resolve(data_cfg)
    card = dataclasses.asdict(read_card(data_cfg.card)[0]) if data_cfg.card else None
    relevant = {k: v for k, v in dataclasses.asdict(data_cfg).items() if k not in ("cache", "num_proc")}
    parts = [CACHE_VERSION, code_fingerprint(), get_renderer(tokenizer, data_cfg).used,
             src.fingerprint(), tokenizer_fingerprint(tokenizer),
             json.dumps([relevant, card, seed, dataclasses.asdict(src) | {"files": [str(f) for f in src.files]}],
                        sort_keys=True, default=str)]
    if data_cfg.val_path:
        parts.append(resolve(data_cfg, val=True).fingerprint())
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _cache_dir() -> Path:
    return cache_root() / "data"


def _save_cache(path: Path, bundle: DataBundle) -> None:
    arrays = {}
    for name, units in (("train", bundle.train), ("val", bundle.val)):
        for k in ("ids", "labels", "ex_lens", "per_unit"):
            arrays[f"{name}_{k}"] = getattr(units, k)
    stats = dataclasses.asdict(bundle.stats)
    arrays["stats"] = np.frombuffer(json.dumps(stats).encode(), dtype=np.uint8)
    with atomic_file(path) as f:  # a concurrent run reads the old cache file or the new one
        np.savez(f, **arrays)


def _load_cache(path: Path) -> Optional[DataBundle]:
    try:
        with np.load(path) as z:
            stats = DataStats(**json.loads(bytes(z["stats"]).decode()))
            split = {name: PackedUnits(*(z[f"{name}_{k}"] for k in ("ids", "labels", "ex_lens", "per_unit")))
                     for name in ("train", "val")}
    except Exception:  # a truncated or foreign file is just a cache miss
        return None
    stats.cached = True
    return DataBundle(split["train"], split["val"], stats)


# ------------------------------------------------------------------------------ prepare


def prepare(data_cfg, tokenizer, seed: int, progress: bool = True) -> DataBundle:
    """Load, convert, tokenize, mask and pack the data of `data_cfg` (cached)."""
    t0 = time.perf_counter()
    renderer = get_renderer(tokenizer, data_cfg)  # checks pad != eos and the prompt style first
    src = resolve(data_cfg)
    note = pin_revision(src)
    path = None
    if data_cfg.cache:
        path = _cache_dir() / f"{cache_key(data_cfg, tokenizer, seed, src)}.npz"
        if path.is_file():
            hit = _load_cache(path)
            if hit is not None:
                hit.stats.seconds = time.perf_counter() - t0
                return hit
    with doing(f"preparing the data ({src.name})",
               "nothing was cached; the next run prepares it again from the start"):
        bundle = _prepare(data_cfg, seed, src, renderer, note, progress)
    if path is not None:
        try:
            _save_cache(path, bundle)
        except OSError:  # a read-only cache must not stop training
            pass
    bundle.stats.seconds = time.perf_counter() - t0
    return bundle


def _prepare(data_cfg, seed: int, src, renderer, note, progress: bool) -> DataBundle:
    stats = DataStats(seq_len=data_cfg.seq_len, notes=[note] if note else [])
    src, train_c, train_w, val_c, val_w = _load(data_cfg, seed, stats, src)
    if not train_c:
        raise UsageError(f"{src.name}: no usable rows after filtering ({_drop_summary(stats)})")
    tooled = [c for c in train_c + val_c if c.tools or any(m.get("tool_calls") for m in c.messages)]
    stats.tool_rows, stats.tool_fallback = len(tooled), sum(map(renderer.tool_fallback, tooled))
    ids, labels, lens = _tokenize_all(train_c, train_w, renderer, data_cfg, stats, progress, "train")
    v_ids, v_labels, v_lens = _tokenize_all(val_c, val_w, renderer, data_cfg, stats, progress, "val")
    if not len(lens):
        raise UsageError(f"{src.name}: no usable examples after tokenization ({_drop_summary(stats)})")
    train = PackedUnits.build(ids, labels, lens, data_cfg.seq_len, data_cfg.packing)
    val = PackedUnits.build(v_ids, v_labels, v_lens, data_cfg.seq_len, data_cfg.packing)
    stats.examples, stats.val_examples, stats.units = len(lens), len(v_lens), len(train)
    stats.tokens = int(lens.sum())
    stats.trained_tokens = int((labels != IGNORE).sum())
    stats.packing_efficiency = packing_efficiency(train, data_cfg.seq_len)
    return DataBundle(train, val, stats)
