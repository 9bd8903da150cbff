"""Value ranges of settings, declared on the dataclass field and checked in one place.

    warmup_steps: int = ranged(10, ge=0)
    lr: float = ranged(2e-4, gt=0)

`check_ranges` walks a built config (or a sub-command's `Args`) and refuses the first value out
of its range with one line naming the key: `train.warmup_steps must be >= 0, got -3`. Every
float setting must also be finite (`nan`, `.inf` and `1e400` parse as floats but are never a
meaningful learning rate, weight or scale) whether or not it declares a range. Numbers in lists
(`merge weights=[...]`) are checked one by one. jsonargparse parses and type-checks; the ranges
are here because its restricted number types (PositiveInt, ...) would replace the plain int/float
in the built dataclass and show as class names in its messages.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from finetune.errors import UsageError

RANGE_KEY = "finetune.range"


@dataclass(frozen=True)
class Range:
    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    hint: str = ""  # said after the refusal, e.g. "(null = all rows)"

    def refusal(self, value: float) -> Optional[str]:
        """Why `value` is outside the range ('must be >= 0'), or None when it is inside."""
        tests = ((self.ge, operator.ge, ">="), (self.gt, operator.gt, ">"),
                 (self.le, operator.le, "<="), (self.lt, operator.lt, "<"))
        if all(bound is None or op(value, bound) for bound, op, _ in tests):
            return None
        lo = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else ""
        hi = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else ""
        if lo and hi:
            return f"must be in {lo}, {hi}"
        return "must be " + " ".join(f"{word} {_num(bound)}" for bound, _, word in tests if bound is not None)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def ranged(default: Any, *, ge=None, gt=None, le=None, lt=None, hint: str = "") -> Any:
    """A dataclass field with a default and a value range checked by `check_ranges`."""
    return field(default=default, metadata={RANGE_KEY: Range(ge, gt, le, lt, hint)})


def check_value(key: str, value: Any, rng: Optional[Range] = None) -> None:
    """Refuse a non-finite float or a number outside `rng`, naming `key` (one UsageError line)."""
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue  # strings ('auto'), None (= the default behaviour), booleans
        if isinstance(v, float) and not math.isfinite(v):
            raise UsageError(f"{key} must be a finite number, got {v}")
        why = rng.refusal(v) if rng is not None else None
        if why:
            raise UsageError(f"{key} {why}, got {v}{' ' + rng.hint if rng.hint else ''}")


def check_ranges(obj: Any, prefix: str = "") -> None:
    """Every field of dataclass `obj` (nested sections too) against its declared range."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_ranges(value, key + ".")
        elif isinstance(value, list) and value and all(dataclasses.is_dataclass(v) for v in value):
            for i, item in enumerate(value):  # items of a list-of-dataclasses field (data.sources)
                check_ranges(item, f"{key}[{i}].")
        else:
            check_value(key, value, f.metadata.get(RANGE_KEY))


_SCALE = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: Any, key: str) -> int:
    """'12GiB' -> 12*2**30, '24GB' -> 24e9, '16000MiB', '1e10' or 16000000000 (bytes) -> bytes, for
    `key` (gpu_memory, max_shard_size): one parser, so every size setting takes the same spellings."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e\+?[0-9]+)?)\s*([kmgt]i?)?b?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UsageError(f"{key}: expected a size like 12GiB, 24GB, 500MB or a number of bytes, got '{text}'")
    size = float(m.group(1)) * _SCALE[(m.group(2) or "").lower()]
    if not 1 <= size < 2**63:
        raise UsageError(f"{key}: expected a size of at least 1 byte and below 8 EiB, got '{text}'")
    return int(size)
