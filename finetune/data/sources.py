"""Where rows come from: a dataset card, a hub id, or local json/jsonl/parquet/csv files or a folder.

Local JSON and JSON Lines go through finetune.data.rows (the json module, not `datasets`: each
row stays a Python object, bad ones are counted by the format adapters, and a broken JSONL line
is reported with its line number). CSV is read with the csv module, every cell as the text it is
(pandas would turn "None", "null" and "N/A" into missing values and an all-number column into
ints). A UTF-8 byte order mark is accepted. Parquet and the hub go through `datasets`; so does
choosing a folder's split files (its own filename patterns: train.*, *-train-*, train/..., never
a test or validation file for training).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from finetune.data.formats import Format
from finetune.data.rows import Rows, read_json_rows
from finetune.errors import FinetuneError, UsageError, first_line
from finetune.resources import find_resource, read_user_text, read_yaml_mapping
from finetune.typed import parse_mapping

EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".parquet": "parquet", ".csv": "csv"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Source:
    """A resolved data source: either local files or a hub dataset, plus how to read its rows."""

    format: str
    files: list[Path] = field(default_factory=list)
    hub_id: Optional[str] = None
    split: str = "train"
    subset: Optional[str] = None
    revision: Optional[str] = None
    data_files: Any = None
    columns: dict = field(default_factory=dict)
    roles: dict = field(default_factory=dict)
    name: str = ""

    def fingerprint(self) -> str:
        """Content hash of local files, or hub id + revision: the data part of the cache key."""
        h = hashlib.sha256()
        if self.hub_id:
            h.update(json.dumps([self.hub_id, self.revision, self.split, self.subset, self.data_files],
                                sort_keys=True, default=str).encode())
        for f in self.files:
            h.update(str(f.name).encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
        return h.hexdigest()


@dataclass
class Card:
    """A dataset card (datasets/NAME.yaml, or a path): where a data set's rows are and how to read
    them. A recipe's data.* settings override the card's."""

    source: Optional[str] = None
    """Required: a hub id, or a file or folder relative to the card."""
    format: Optional[Format] = None
    """Row format: alpaca, sharegpt, messages, text or prompt_completion."""
    split: str = "train"
    """Split to read from a hub dataset or folder."""
    subset: Optional[str] = None
    """Hub dataset configuration (subset) name."""
    revision: Optional[str] = None
    """Hub dataset revision."""
    data_files: Optional[Union[str, list[str]]] = None
    """Files (or globs) to read from the folder or hub dataset, instead of matching the split."""
    columns: dict[str, str] = field(default_factory=dict)
    """Column renames, e.g. {instruction: question, output: answer}."""
    roles: dict[str, str] = field(default_factory=dict)
    """Extra role-name mappings for sharegpt, e.g. {bot: assistant}."""
    name: Optional[str] = None
    """The card's name (documentation only)."""
    description: Optional[str] = None
    """What the rows are (documentation only)."""
    license: Optional[str] = None
    """The data's license (documentation only)."""
    homepage: Optional[str] = None
    """Where the data set is described (documentation only)."""
    citation: Optional[str] = None
    """How to cite the data set (documentation only)."""
    notes: Optional[str] = None
    """Anything else worth knowing (documentation only)."""
    val_source: Optional[str] = None
    """A separate validation source (documentation only: data.val_path is what is read)."""
    system_prompt: Optional[str] = None
    """A system prompt suited to the rows (documentation only: data.system_prompt is what applies)."""


def read_card(name: str) -> tuple[Card, Path]:
    """A dataset card (datasets/NAME.yaml or a path), its keys checked, and where it was found."""
    path = find_resource("datasets", name)
    where = f"dataset card {path}"
    card = parse_mapping(Card, read_yaml_mapping(path, "dataset card"), where)
    if card.source is None:
        raise UsageError(f"{where}: missing 'source' (a hub id or a path relative to the card)")
    return card, path


def _local_or_hub(spec: str, base: Optional[Path], split: str = "train",
                  data_files: Any = None) -> tuple[list[Path], Optional[str]]:
    p = Path(os.path.expanduser(spec))
    if not p.is_absolute() and base is not None and (base / p).exists():
        p = base / p
    if p.exists():
        return _files_of(p, split, data_files), None
    if HUB_ID.match(spec) and Path(spec).suffix.lower() not in EXTENSIONS and not spec.startswith("."):
        return [], spec
    raise UsageError(f"data path not found: {spec}")


def _files_of(p: Path, split: str = "train", data_files: Any = None) -> list[Path]:
    if not os.access(p, os.R_OK):
        raise UsageError(f"cannot read data {p}: permission denied")
    if p.is_file():
        if p.suffix.lower() not in EXTENSIONS:
            raise UsageError(f"data file {p}: unsupported type '{p.suffix}' (expected {', '.join(EXTENSIONS)})")
        return [p]
    # `datasets` takes seconds to import; only folders need its split patterns.
    from datasets.data_files import get_data_patterns, resolve_pattern

    if data_files:
        patterns, what = ([data_files] if isinstance(data_files, str) else list(data_files)), "data.data_files"
    else:
        found = get_data_patterns(str(p))
        if split not in found:
            raise UsageError(f"data folder {p}: no '{split}' files (its file names give the splits "
                             f"{', '.join(map(str, found))}); name them like {split}.jsonl or {split}-00000.parquet, "
                             "or list them in data.data_files")
        patterns, what = found[split], f"split '{split}'"
    files = []
    for pattern in patterns:
        try:
            files += [Path(f) for f in resolve_pattern(pattern, base_path=str(p))]
        except FileNotFoundError:
            if data_files:  # a pattern the user wrote must match; the split's own patterns may not
                raise UsageError(f"data.data_files: '{pattern}' matches no file in {p}") from None
    files = sorted({f for f in files if f.is_file() and f.suffix.lower() in EXTENSIONS})
    if not files:
        raise UsageError(f"data folder {p} has no {'/'.join(EXTENSIONS)} files for {what}")
    return files


def resolve(data_cfg, val: bool = False, need_format: bool = True) -> Source:
    """DataConfig (+ its card) -> Source. With val=True, the source for data.val_path.
    need_format=False: no format set is fine (preference data detects it from the rows: "")."""
    card, card_path = (Card(), None)
    if data_cfg.card:
        card, card_path = read_card(data_cfg.card)
    spec = data_cfg.val_path if val else (data_cfg.path or card.source)
    if not spec:
        raise UsageError("no data given: set data.card (a dataset card) or data.path (a file, folder or hub id)")
    base = card_path.parent if card_path is not None and not (val or data_cfg.path) else Path.cwd()
    split = card.split if data_cfg.split == "train" else data_cfg.split
    data_files = None if val else (data_cfg.data_files or (card.data_files if not data_cfg.path else None))
    files, hub_id = _local_or_hub(str(spec), base, split, data_files)
    fmt = data_cfg.format or card.format
    if not fmt and need_format:
        raise UsageError(f"data.format is not set and {'card ' + str(card_path) if card_path else 'there is no card'} "
                         "names none (alpaca, sharegpt, messages, text, prompt_completion)")
    return Source(format=fmt or "", files=files, hub_id=hub_id, split=split,
                  subset=data_cfg.subset or card.subset, revision=data_cfg.revision or card.revision,
                  data_files=data_files,
                  columns={**card.columns, **(data_cfg.columns or {})},
                  roles={**card.roles, **(data_cfg.roles or {})},
                  name=hub_id or (str(files[0]) if len(files) == 1 else str(spec)))


def pin_revision(src: Source) -> Optional[str]:
    """Give a hub dataset without a revision the commit it resolves to now, so the cache key and
    the rows read agree; offline, say that the local copy is used (its commit unknown)."""
    if not src.hub_id or src.revision:
        return None
    from huggingface_hub import HfApi, constants

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not offline:
        try:
            src.revision = HfApi().dataset_info(src.hub_id).sha
            return f"hub dataset {src.hub_id}: revision {src.revision} (data.revision pins it)"
        except Exception:  # unreachable hub: fall through to the local copy
            pass
    return (f"hub dataset {src.hub_id}: no data.revision and the hub is not reachable: using the local copy "
            "as it is (set data.revision to pin a commit)")


def _read_csv(path: Path, out: Rows) -> None:
    try:
        reader = csv.DictReader(io.StringIO(read_user_text(path, "data"), newline=""))
        for row in reader:
            row.pop(None, None)  # cells beyond the header: no column to name them
            out.rows.append(row)
            out.where.append(f"{path} line {reader.line_num}")
    except csv.Error as e:
        raise UsageError(f"cannot read csv file {path}: {e}") from None


def _read_with_datasets(path: Path, kind: str, out: Rows) -> None:
    # `datasets` takes seconds to import; only parquet/csv files and hub ids need it.
    import datasets

    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:
        raise UsageError(f"cannot read {kind} file {path}: {first_line(e)}") from None
    rows = ds.to_list()
    out.rows.extend(rows)
    out.where.extend(f"{path} row {i + 1}" for i in range(len(rows)))


def _read_hub(src: Source, out: Rows) -> None:
    import datasets  # slow import, see _read_with_datasets

    try:
        ds = datasets.load_dataset(src.hub_id, name=src.subset, split=src.split, revision=src.revision,
                                   data_files=src.data_files)
    except Exception as e:
        raise FinetuneError(f"cannot load dataset '{src.hub_id}' (split {src.split}) from the hub: "
                            f"{first_line(e)[:200]}") from None
    rows = ds.to_list()
    out.rows.extend(rows)
    out.where.extend(f"{src.hub_id} row {i + 1}" for i in range(len(rows)))


def load_rows(src: Source, strict: bool = False) -> Rows:
    """Every row of `src`, with where each came from; strict=False counts broken JSONL lines."""
    out = Rows()
    if src.hub_id:
        _read_hub(src, out)
        return out
    for f in src.files:
        kind = EXTENSIONS[f.suffix.lower()]
        if not os.access(f, os.R_OK):
            raise UsageError(f"cannot read data {f}: permission denied")
        if kind in ("json", "jsonl"):
            read_json_rows(f, "data", out, strict)
        elif kind == "csv":
            _read_csv(f, out)
        else:
            _read_with_datasets(f, kind, out)
    return out
