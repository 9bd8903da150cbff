"""`finetune data ... dump=PATH`: every training example as the model will see it, one JSON line each.

Packing is undone (position ids restart at 0 where an example starts), so each line is one
example: `text` (its tokens decoded, special tokens included), `input_ids`, `labels` (-100 where
nothing is trained) and `trained` (the decoded runs of trained tokens, in order). Users check
what is trained without reading code; the tests read it too.

Preference data (finetune.data.preference) is one line per pair: `prompt` (decoded, context:
nothing in it counts), `chosen` and `rejected` (decoded: every token counts), and their ids;
unpaired feedback (KTO) has `completion` and `label` instead of the two sides.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Sequence, Union

from finetune.data.tokenize import IGNORE
from finetune.errors import UsageError
from finetune.fs import atomic_file


def unpacked(units: Sequence[dict]) -> Iterator[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each example inside the packed units, in unit order."""
    for unit in units:
        pos = unit["position_ids"]
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:]):
            yield unit["input_ids"][a:b], unit["labels"][a:b]


def trained_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The maximal runs of trained tokens, in order."""
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def record(tokenizer, ids: list[int], labels: list[int]) -> dict:
    decode = lambda x: tokenizer.decode(x, skip_special_tokens=False)  # noqa: E731
    return {"text": decode(ids), "input_ids": list(ids), "labels": list(labels),
            "trained": [decode(run) for run in trained_runs(ids, labels)]}


PREF_KEYS = ("prompt", "chosen", "rejected", "completion")


def is_preference(units: Sequence[dict]) -> bool:
    """Units of preference data (pairs or labelled answers) rather than packed SFT examples."""
    return bool(len(units)) and "prompt_ids" in units[0]


def pref_record(tokenizer, unit: dict) -> dict:
    """One pair (or labelled answer) decoded, with its ids: the prompt is context, the rest counts."""
    out = {}
    for key in PREF_KEYS:
        if f"{key}_ids" in unit:
            out[key] = tokenizer.decode(unit[f"{key}_ids"], skip_special_tokens=False)
    if "label" in unit:
        out["label"] = bool(unit["label"])
    return out | {f"{k}_ids": list(unit[f"{k}_ids"]) for k in PREF_KEYS if f"{k}_ids" in unit}


def check_dump_path(path: Union[str, Path]) -> Path:
    """Refuse a dump path that cannot be written, before any data is prepared."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(f"dump={path} is a folder; give a file path such as {path / 'train.jsonl'}")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK)):
        raise UsageError(f"dump={path}: cannot write into {parent}")
    return path


def dump_examples(units: Sequence[dict], tokenizer, path: Union[str, Path]) -> int:
    """Write one JSON line per example of `units` to `path` (atomically); returns how many."""
    path = check_dump_path(path)
    n = 0
    try:
        with atomic_file(path) as f:
            records = ((pref_record(tokenizer, u) for u in units) if is_preference(units)
                       else (record(tokenizer, ids, labels) for ids, labels in unpacked(units)))
            for rec in records:
                f.write((json.dumps(rec, ensure_ascii=False) + "\n").encode())
                n += 1
    except OSError as e:
        raise UsageError(f"cannot write dump={path}: {e.strerror or e}") from None
    return n
