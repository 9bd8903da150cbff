"""Pack tokenized examples into seq_len units, and collate units into padded batches.

A unit is {"input_ids", "labels", "position_ids"} (lists of ints). Position ids restart at 0 for
every example inside a pack: transformers (5.x) then builds a block-diagonal causal mask from them
when the model is called with attention_mask=None and use_cache=False, so attention never
crosses examples (tests/data/test_pack.py checks logits inside a pack equal logits alone).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch

Example = tuple[list[int], list[int]]


def single_units(examples: Sequence[Example]) -> list[dict]:
    """The unpacked path: one example per unit."""
    return [{"input_ids": list(ids), "labels": list(lab), "position_ids": list(range(len(ids)))}
            for ids, lab in examples]


def best_fit_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices grouped into bins of total length <= capacity.

    Longest first; each goes into the open bin with the least room that still fits it (ties:
    the oldest bin), so the result is deterministic for a given input order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (remaining capacity, bin index)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example of length {n} exceeds pack capacity {capacity}")
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            left, b = room.pop(k)
        else:
            left, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if left - n > 0:
            bisect.insort(room, (left - n, b))
    return bins


def pack(examples: Sequence[Example], seq_len: int) -> list[dict]:
    """Best-fit pack examples (each <= seq_len) into units of at most seq_len tokens."""
    units = []
    for members in best_fit_bins([len(ids) for ids, _ in examples], seq_len):
        ids, labels, pos = [], [], []
        for i in members:
            e_ids, e_lab = examples[i]
            ids += e_ids
            labels += e_lab
            pos += range(len(e_ids))
        units.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return units


def make_units(examples: Sequence[Example], seq_len: int, packing: bool) -> list[dict]:
    return pack(examples, seq_len) if packing else single_units(examples)


def packing_efficiency(units: Sequence[dict], seq_len: int) -> float:
    """Real tokens / (units x seq_len): 1.0 means no padding would be needed at seq_len."""
    if not len(units):
        return 0.0
    total = int(units.lengths().sum()) if hasattr(units, "lengths") else sum(len(u["input_ids"]) for u in units)
    return total / (len(units) * seq_len)


def collate(units: Sequence[dict], pad_id: int) -> dict:
    """Units -> LongTensors [B, L], L = longest unit. The padded tail gets labels -100 and
    position ids restarting at 0, so it is a segment of its own that nothing attends to."""
    L = max(len(u["input_ids"]) for u in units)
    B = len(units)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    for b, u in enumerate(units):
        n = len(u["input_ids"])
        input_ids[b, :n] = torch.as_tensor(u["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.as_tensor(u["labels"], dtype=torch.long)
        position_ids[b, :n] = torch.as_tensor(u["position_ids"], dtype=torch.long)
        if n < L:
            position_ids[b, n:] = torch.arange(L - n)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


class PackedUnits(Sequence):
    """Units stored flat in numpy (what `prepare` returns): a read-only sequence of unit dicts.

    Indexing gives the same {"input_ids", "labels", "position_ids"} lists as `pack`, built on
    demand, so 52k examples cost a few arrays instead of tens of millions of Python ints, and
    the cache loads them in well under a second."""

    def __init__(self, ids, labels, ex_lens, per_unit):
        self.ids = np.asarray(ids, dtype=np.int32)
        self.labels = np.asarray(labels, dtype=np.int32)
        self.ex_lens = np.asarray(ex_lens, dtype=np.int64)
        self.per_unit = np.asarray(per_unit, dtype=np.int64)
        ex_end = np.cumsum(self.ex_lens)
        self._ex_start = ex_end - self.ex_lens
        first_ex = np.cumsum(self.per_unit) - self.per_unit
        self._first_ex = first_ex
        self._start = self._ex_start[first_ex] if len(first_ex) else first_ex
        self._len = np.add.reduceat(self.ex_lens, first_ex) if len(first_ex) else first_ex

    def __len__(self) -> int:
        return len(self.per_unit)

    def lengths(self):
        """Tokens per unit (numpy)."""
        return self._len

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, n = int(self._start[i]), int(self._len[i])
        f, k = int(self._first_ex[i]), int(self.per_unit[i])
        pos = []
        for m in self.ex_lens[f:f + k].tolist():
            pos += range(m)
        return {"input_ids": self.ids[a:a + n].tolist(), "labels": self.labels[a:a + n].tolist(), "position_ids": pos}

    def __eq__(self, other) -> bool:
        return len(self) == len(other) and all(self[i] == other[i] for i in range(len(self)))

    @classmethod
    def build(cls, ids, labels, lens, seq_len: int, packing: bool) -> "PackedUnits":
        """From flat example arrays (example j = ids[off_j:off_j + lens_j]) to packed units."""
        lens = np.asarray(lens, dtype=np.int64)
        if packing:
            bins = best_fit_bins(lens.tolist(), seq_len)
            order = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=len(lens))
            per_unit = [len(b) for b in bins]
        else:
            order, per_unit = np.arange(len(lens)), [1] * len(lens)
        starts = np.cumsum(lens) - lens
        new_lens = lens[order]
        # token gather index: for each example in packed order, its token range in the flat arrays
        gather = np.repeat(starts[order] - (np.cumsum(new_lens) - new_lens), new_lens) + np.arange(int(new_lens.sum()))
        return cls(np.asarray(ids)[gather], np.asarray(labels)[gather], new_lens, per_unit)
