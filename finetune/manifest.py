"""Checksums of a saved folder, written once and checked by every command that reads one.

A training checkpoint (finetune.training.checkpoint) carries `manifest.json` (sha256 and size of
every file) and a `COMPLETE` marker holding the manifest's own hash. Resume checked them; merge,
eval, export and moe read the same folders (an adapter is a checkpoint's `final/`), so they check
them too, through `check_input`: a flipped byte or a truncated file is one line naming the file,
not a SafetensorError from deep inside a load. Folders without a manifest (a combined adapter, a
merged model, a hub download) get the check safetensors allows without one: every weights file's
header must parse and its length match the header.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Union

from finetune.errors import UsageError, first_line

MARKER = "COMPLETE"
MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def listed_files(root: Path) -> list[Path]:
    """The files a manifest covers: all under root but the manifest and the marker."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name not in (MARKER, MANIFEST))


def build_manifest(root: Path, step: Optional[int], version: int = 1) -> bytes:
    files = {}
    for p in listed_files(root):
        rel = p.relative_to(root).as_posix()
        files[rel] = {"sha256": sha256(p), "size": p.stat().st_size}
    doc = {"format": version, "step": step, "files": files}
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def problem(path: Path, need_marker: bool = True) -> Optional[str]:
    """Why `path` is not a complete, intact saved folder, or None when it is. Without
    `need_marker`, a folder with neither marker nor manifest passes (nothing to check)."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} is not a directory"
    marker, manifest = path / MARKER, path / MANIFEST
    if not need_marker and not marker.exists() and not manifest.exists():
        return None
    if not marker.is_file():
        return f"{path} is incomplete (no {MARKER} marker; the save was interrupted)"
    if not manifest.is_file():
        return f"{path} is corrupt: {MANIFEST} is missing"
    try:
        raw = manifest.read_bytes()
        expected = marker.read_text().split()
    except OSError as e:
        return f"{path} is unreadable: {e.strerror}"
    # The marker holds the manifest's hash, so a damaged manifest is caught too.
    if not expected or hashlib.sha256(raw).hexdigest() != expected[0]:
        return f"{path} is corrupt: {MANIFEST} does not match its {MARKER} marker"
    try:
        files = json.loads(raw)["files"]
    except (ValueError, KeyError, TypeError):
        return f"{path} is corrupt: {MANIFEST} is not valid"
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            return f"{path} is corrupt: {rel} is missing"
        try:
            if f.stat().st_size != meta["size"]:
                return f"{path} is corrupt: {rel} has {f.stat().st_size} bytes, expected {meta['size']} (truncated?)"
            if sha256(f) != meta["sha256"]:
                return f"{path} is corrupt: {rel} fails its sha256 checksum"
        except OSError as e:
            return f"{path} is unreadable: {rel}: {e.strerror}"
    return None


def weights_problem(path: Path) -> Optional[str]:
    """The first *.safetensors file in `path` whose header does not parse or whose length does
    not match it (a truncated download or copy), as one phrase; None when all load."""
    from safetensors import safe_open

    for f in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception as e:  # SafetensorError, OSError: whatever it is, the file is unusable
            return f"{f} is not a readable safetensors file ({first_line(e)}; truncated or corrupt?)"
    return None


def check_input(path: Union[str, Path], what: str = "model") -> None:
    """Refuse (exit 2, one line naming the file) a local model or adapter folder whose manifest
    checksums fail, or whose safetensors files are truncated. Hub ids and missing paths are the
    loaders' to report."""
    p = Path(str(path)).expanduser()
    if not p.is_dir():
        return
    why = problem(p, need_marker=False) or weights_problem(p)
    if why:
        raise UsageError(f"{what} {why}")
