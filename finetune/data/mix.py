"""Several data sources in one run (`data.sources`), mixed by weight or concatenated.

Each source is prepared by finetune.data.pipeline.prepare on its own DataConfig (data.* with the
source's card/path/format/columns/roles/system prompt/prompt style on top, packing off), so each
is read, converted, counted and cached on its own: changing one source's weight re-reads nothing,
adding a source tokenizes only that one. Then:

- mix=weight: the mix has as many training examples as the sources together; source i gets
  round(total * w_i / sum w) of them, drawn without replacement from its shuffled examples, a
  small source repeated whole as often as needed (and the rest drawn), a large one subsampled.
- mix=concat: every example of every source once (weights unused).

The chosen examples are shuffled together (seeded) and packed as one data set; the validation
examples of all sources are kept as they are. The statistics name each source: rows, examples,
how many it contributes, its share of the trained tokens, drops.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from finetune.config import DataConfig, DataSource, check_data_sources
from finetune.data import pipeline
from finetune.data.pack import PackedUnits, packing_efficiency
from finetune.data.tokenize import IGNORE
from finetune.errors import UsageError

# data.* fields a source may set for itself (None / empty = data.*'s value)
OWN = ("card", "path", "format", "split", "data_files", "columns", "roles", "system_prompt", "prompt_style",
       "train_on_prompt", "max_rows")


def prepare_data(data_cfg: DataConfig, tokenizer, seed: int, progress: bool = True) -> pipeline.DataBundle:
    """What training trains on: data.sources mixed when given, else the one card/path."""
    if not data_cfg.sources:
        return pipeline.prepare(data_cfg, tokenizer, seed, progress)
    return prepare_mixed(data_cfg, tokenizer, seed, progress)


def source_config(data_cfg: DataConfig, src: DataSource) -> DataConfig:
    """The DataConfig one source is prepared with: data.* under the source's own settings."""
    cfg = dataclasses.replace(data_cfg, sources=[], packing=False, val_path=None)
    for name in OWN:
        value = getattr(src, name)
        if value is not None and value != {} and not (name == "split" and value == "train"):
            setattr(cfg, name, value)
    if src.card or src.path:  # the source's own card/path replace each other as in data.*
        cfg.card, cfg.path = src.card, src.path
    return cfg


def _examples(units: PackedUnits) -> list[tuple[int, int]]:
    """(start, length) of each example in the flat arrays of unpacked units."""
    lens = units.ex_lens
    starts = np.cumsum(lens) - lens
    return list(zip(starts.tolist(), lens.tolist()))


def _draw(n_have: int, n_want: int, rng: np.random.Generator) -> np.ndarray:
    """n_want indices into n_have examples: whole shuffled copies, then a shuffled remainder."""
    reps, rest = divmod(n_want, n_have)
    parts = [rng.permutation(n_have) for _ in range(reps)] + [rng.permutation(n_have)[:rest]]
    return np.concatenate(parts).astype(np.int64)


def _gather(parts: list[tuple[PackedUnits, np.ndarray]], order_rng=None):
    """Flat (ids, labels, lens) of the chosen examples of each source, shuffled when a rng is given."""
    picks = []
    for k, (units, idx) in enumerate(parts):
        ex = _examples(units)
        picks += [(k, *ex[int(i)]) for i in idx]
    if order_rng is not None:
        picks = [picks[i] for i in order_rng.permutation(len(picks))]
    ids = [parts[k][0].ids[a:a + n] for k, a, n in picks]
    labels = [parts[k][0].labels[a:a + n] for k, a, n in picks]
    cat = (lambda xs: np.concatenate(xs)) if picks else (lambda xs: np.zeros(0, np.int32))
    return cat(ids), cat(labels), np.asarray([n for _, _, n in picks], np.int64)


def prepare_mixed(data_cfg: DataConfig, tokenizer, seed: int, progress: bool = True) -> pipeline.DataBundle:
    t0 = time.perf_counter()
    check_data_sources(data_cfg)  # also checked when a Config is built (before any model loads)
    bundles = []
    for i, src in enumerate(data_cfg.sources):
        try:
            bundles.append(pipeline.prepare(source_config(data_cfg, src), tokenizer, seed, progress))
        except UsageError as e:
            raise UsageError(f"data.sources[{i}]: {e}") from None
    counts = [len(b.train.ex_lens) for b in bundles]
    total = sum(counts)
    rng = np.random.default_rng(seed)
    if data_cfg.mix == "concat":
        want = counts
    else:
        weights = np.asarray([s.weight for s in data_cfg.sources], dtype=float)
        want = [max(1, int(round(total * w / weights.sum()))) for w in weights]
    train_idx = [_draw(n, w, rng) for n, w in zip(counts, want)]
    ids, labels, lens = _gather([(b.train, idx) for b, idx in zip(bundles, train_idx)], rng)
    v_ids, v_labels, v_lens = _gather([(b.val, np.arange(len(b.val.ex_lens))) for b in bundles])
    train = PackedUnits.build(ids, labels, lens, data_cfg.seq_len, data_cfg.packing)
    val = PackedUnits.build(v_ids, v_labels, v_lens, data_cfg.seq_len, data_cfg.packing)
    return pipeline.DataBundle(train, val, _stats(data_cfg, bundles, want, train, lens, labels, t0))


def _stats(data_cfg, bundles, want, train, lens, labels, t0) -> pipeline.DataStats:
    st = pipeline.DataStats(seq_len=data_cfg.seq_len)
    names = []
    trained_all = int((labels != IGNORE).sum()) or 1
    for i, (src, b, n) in enumerate(zip(data_cfg.sources, bundles, want)):
        s = b.stats
        names.append(src.card or src.path)
        st.rows_loaded += s.rows_loaded
        for reason, k in s.dropped.items():
            st.drop(reason, s.first_where.get(reason, ""), k)
        for fix, k in s.fixed.items():
            st.fixed[fix] = st.fixed.get(fix, 0) + k
        st.truncated += s.truncated
        st.notes += s.notes
        per_ex_trained = s.trained_tokens / max(s.examples, 1)
        st.sources.append({
            "source": src.card or src.path, "weight": src.weight, "rows": s.rows_loaded, "dropped": s.dropped_total,
            "examples": s.examples, "used": int(n), "val_examples": s.val_examples, "cached": s.cached,
            "trained_share": min(1.0, n * per_ex_trained / trained_all)})
    st.source = f"{len(bundles)} sources (data.mix={data_cfg.mix}): " + ", ".join(names)
    st.examples, st.val_examples, st.units = int(len(lens)), sum(b.stats.val_examples for b in bundles), len(train)
    st.tokens, st.trained_tokens = int(lens.sum()), int((labels != IGNORE).sum())
    st.packing_efficiency = packing_efficiency(train, data_cfg.seq_len)
    st.cached = all(b.stats.cached for b in bundles)
    st.seconds = time.perf_counter() - t0
    return st
