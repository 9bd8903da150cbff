"""Crash-safe checkpoints: PEFT adapter + tokenizer + resolved config + resumable training state.

A checkpoint directory (`out_dir/step-NNNNNN/` or `out_dir/final/`) is only ever seen complete:
everything is written into a hidden temp dir beside it (same filesystem, so rename is atomic),
checksummed into `manifest.json`, fsynced, marked `COMPLETE` last, then renamed into place. A kill
-9 at any point leaves either the old complete copy or the new one, never a half-written dir that
`latest_checkpoint` would pick up. Loading verifies the checksums first, so a flipped byte or a
truncated file is reported instead of silently resuming from garbage.

Training state is a plain dict of tensors / numbers / strings / lists / dicts saved with
`torch.save` and loaded with `weights_only=True`: nothing in a checkpoint is ever unpickled. What
it holds and where a run resumes from is finetune.training.state's.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import re
import shutil
import socket
import sys
import uuid
from pathlib import Path
from typing import Optional

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from finetune.errors import FinetuneError, UsageError, first_line
from finetune import manifest
from finetune.fs import describe_write_error as _describe, follow_umask
from finetune.models.adapters import add_serving_note
from finetune.portable import record_hub_base, save_tokenizer

MARKER = manifest.MARKER
MANIFEST = manifest.MANIFEST
STATE_FILE = "training_state.pt"
CONFIG_FILE = "config.yaml"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1

STEP_RE = re.compile(r"^step-(\d{6,})$")
# Hidden names so globbing for step-* / final never sees work in progress.
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"

_LIVE_TOKENS: set[str] = set()  # side-dir tokens created by this process


def _host() -> str:
    return socket.gethostname().replace(".", "_") or "host"


def say(msg: str) -> None:
    """Notes and warnings go to stderr as one line, like the CLI's errors."""
    print(msg, file=sys.stderr, flush=True)


def step_dir(out_dir: Path | str, step: int) -> Path:
    return Path(out_dir) / f"step-{step:06d}"


# --------------------------------------------------------------------------- low-level IO


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write + fsync through our own file object, so a full disk surfaces as OSError(ENOSPC)
    (torch.save straight to a path reports it as an anonymous RuntimeError)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _build_manifest(root: Path, step: Optional[int]) -> bytes:
    return manifest.build_manifest(root, step, FORMAT_VERSION)


def _problem(path: Path) -> Optional[str]:
    """Why `path` is not a usable complete checkpoint, or None when it is (finetune.manifest)."""
    return manifest.problem(Path(path))


def is_complete(path: Path | str) -> bool:
    """Marker present, manifest intact, every file's size and sha256 as recorded."""
    return _problem(Path(path)) is None


def verify(path: Path | str) -> None:
    """Raise FinetuneError naming the bad file when `path` is not a complete, intact checkpoint."""
    problem = _problem(Path(path))
    if problem:
        raise FinetuneError(f"checkpoint {problem}")


# --------------------------------------------------------------------------- leftovers


def _owner_alive(name: str) -> bool:
    """Temp names end in .HOST.PID.TOKEN; a dir whose writer on this host is gone is garbage."""
    parts = name.rsplit(".", 3)
    if len(parts) != 4:
        return True
    _, host, pid, token = parts
    if host != _host() or not pid.isdigit():
        return True  # another node's writer on a shared filesystem: not ours to judge
    if int(pid) == os.getpid():
        # In a container a restarted job often gets the killed one's pid: only our own tokens live.
        return token in _LIVE_TOKENS
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def recover(out_dir: Path | str) -> None:
    """Finish what a killed save left behind in out_dir.

    A kill between "rename old aside" and "rename new in" leaves `.old-NAME.*` and no NAME: put the
    old complete copy back. Temp dirs of dead writers are only partial work of ours: remove them.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    for p in sorted(out_dir.iterdir()):
        if not p.is_dir() or _owner_alive(p.name):
            continue
        if p.name.startswith(OLD_PREFIX):
            name = p.name[len(OLD_PREFIX):].rsplit(".", 3)[0]
            target = out_dir / name
            if not target.exists() and is_complete(p):
                os.rename(p, target)
                _fsync_path(out_dir)
                say(f"note: restored {target} from an interrupted save")
            elif is_complete(target):
                shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(TMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- save


def _side_name(prefix: str, name: str) -> str:
    token = uuid.uuid4().hex[:8]
    _LIVE_TOKENS.add(token)
    return f"{prefix}{name}.{_host()}.{os.getpid()}.{token}"


def save_checkpoint(
    path: Path | str,
    *,
    model,
    tokenizer=None,
    config_yaml: str,
    state: Optional[dict] = None,
    adapter_weights: Optional[dict] = None,
    step: Optional[int] = None,
) -> Path:
    """Atomically write a checkpoint dir at `path` (replacing a previous one there) and return it.

    `model` is a peft PeftModel (saved with save_pretrained: adapter_config.json +
    adapter_model.safetensors); `adapter_weights`, already in peft's saved form (e.g. gathered
    from FSDP shards, see finetune.training.distributed), replace the tensors it would read from the model.
    `state` is the resumable training state (see `load_state`). On any
    failure the temp dir is removed, existing checkpoints are untouched, and FinetuneError says
    which complete checkpoint is still there.
    """
    path = Path(path)
    parent = path.parent
    if step is None:
        m = STEP_RE.match(path.name)
        step = int(m.group(1)) if m else (state or {}).get("step")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FinetuneError(f"could not save checkpoint {path}: cannot create {parent}: {_describe(e)}") from e
    recover(parent)
    if path.exists() and not (path / MARKER).is_file():
        # overwrite=true promises nothing is deleted: only our own (marked) checkpoints are replaced.
        raise FinetuneError(f"could not save checkpoint {path}: it exists and is not a checkpoint written by "
                            f"finetune (no {MARKER} marker); move it away and resume, nothing was changed")
    tmp = parent / _side_name(TMP_PREFIX, path.name)
    try:
        tmp.mkdir()
        if adapter_weights is None:
            # the trained adapter only (a preference run's frozen "reference" adapter is its input)
            model.save_pretrained(str(tmp), safe_serialization=True, selected_adapters=["default"])
        else:  # save_pretrained would read the (sharded) model; write its two files from what we have
            peft_config = copy.copy(model.peft_config["default"])
            peft_config.inference_mode = True  # as save_pretrained records it
            peft_config.save_pretrained(str(tmp))
            save_file(adapter_weights, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        record_hub_base(tmp)  # the hub id, not this machine's path to its local copy
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        add_serving_note(tmp)  # DoRA, modules_to_save: said in the model card, before it is checksummed
        _write_bytes(tmp / CONFIG_FILE, config_yaml.encode())
        if state is not None:
            buf = io.BytesIO()
            torch.save(state, buf)
            _check_weights_only(buf, path)
            _write_bytes(tmp / STATE_FILE, buf.getbuffer())
            del buf
        follow_umask(tmp)  # safetensors leaves 0600 files: a server running as another user reads these
        for f in manifest.listed_files(tmp):  # files written by peft / transformers are not fsynced by them
            _fsync_path(f)
        doc = _build_manifest(tmp, step)
        _write_bytes(tmp / MANIFEST, doc)
        _write_bytes(tmp / MARKER, (hashlib.sha256(doc).hexdigest() + "\n").encode())
        _fsync_path(tmp)
        _publish(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, Exception):
            raise  # Ctrl-C / SystemExit: cleaned up, let the caller's handler run
        why = str(e) if type(e) is FinetuneError else _describe(e)
        raise FinetuneError(f"could not save checkpoint {path}: {why}; {_intact(path)}") from e
    return path


def _weights_only_refusal(e: Exception) -> str:
    text = str(e)
    m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if m:
        return f"it holds a pickled {m.group(1)}"
    return first_line(e)


def _check_weights_only(buf: io.BytesIO, path: Path) -> None:
    """Refuse at save time what resume would refuse later, so a run never learns at step 0 of
    its resume that its checkpoints were unloadable."""
    buf.seek(0)
    try:
        torch.load(buf, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FinetuneError(
            f"training state is not loadable with weights_only=True ({_weights_only_refusal(e)}); "
            "keep it to tensors, numbers, strings, lists and dicts") from None
    buf.seek(0, io.SEEK_END)


def _publish(tmp: Path, path: Path) -> None:
    """Rename tmp into place. Replacing: old aside, new in, old deleted, so at every instant a
    complete copy exists under `path` or (after a crash, restored by `recover`) beside it."""
    parent = path.parent
    old = None
    if path.exists():
        old = parent / _side_name(OLD_PREFIX, path.name)
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        raise
    _fsync_path(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _intact(path: Path) -> str:
    if is_complete(path):
        return f"the previous checkpoint {path} is intact"
    prev = latest_checkpoint(path.parent, quiet=True)
    if prev is not None:
        return f"the previous checkpoint {prev} is intact"
    return "no earlier checkpoint was touched"


# --------------------------------------------------------------------------- find / prune


def _step_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    if not out_dir.is_dir():
        return []
    found = []
    for p in out_dir.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: Path | str, quiet: bool = False) -> Optional[Path]:
    """The highest complete `step-NNNNNN` in out_dir, or None. Temp dirs are never candidates;
    a dir that has its marker but fails verification is skipped with a warning."""
    for _, p in reversed(_step_dirs(Path(out_dir))):
        problem = _problem(p)
        if problem is None:
            return p
        if not quiet and (p / MARKER).exists():
            say(f"warning: skipping checkpoint {problem}")
    return None


def saved_step(path: Path | str) -> Optional[int]:
    """The step a complete checkpoint was saved at (its manifest records it), or None."""
    path = Path(path)
    m = STEP_RE.match(path.name)
    if m:
        return int(m.group(1))
    try:
        step = json.loads((path / MANIFEST).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return int(step) if isinstance(step, int) else None


def prune(out_dir: Path | str, keep_last: Optional[int]) -> list[Path]:
    """Delete all but the newest `keep_last` complete step-* dirs (call it after a save);
    returns what was removed.

    The kept ones are verified, so a corrupt newest dir never costs the last good one. Older
    complete step dirs go; final/, incomplete or corrupt dirs newer than the kept ones, and
    anything else in out_dir are never touched.
    """
    if keep_last is None:
        return []
    if keep_last < 1:
        raise UsageError(f"train.keep_last must be >= 1, got {keep_last}")
    kept, doomed = 0, []
    for _, p in reversed(_step_dirs(Path(out_dir))):
        if kept < keep_last:
            kept += is_complete(p)
        elif (p / MARKER).is_file():
            doomed.append(p)
    for p in reversed(doomed):
        # Rename first so a crash mid-delete leaves a hidden leftover, not a half-deleted step dir.
        trash = p.parent / _side_name(TMP_PREFIX, p.name)
        os.rename(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed[::-1]


# --------------------------------------------------------------------------- load


def load_state(path: Path | str) -> dict:
    """Verify checksums, then torch.load(weights_only=True) the training state onto the CPU."""
    path = Path(path)
    verify(path)
    f = path / STATE_FILE
    if not f.is_file():
        raise FinetuneError(f"checkpoint {path} has no {STATE_FILE} (an adapter-only save cannot be resumed)")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for anything but plain tensors / containers
        raise FinetuneError(f"cannot load {f} with weights_only=True: {_weights_only_refusal(e)}") from e


def load_adapter_weights(model, path: Path | str, adapter_name: str = "default") -> None:
    """Load the checkpoint's adapter_model.safetensors into a PeftModel's adapter in place."""
    path = Path(path)
    verify(path)
    f = path / ADAPTER_WEIGHTS
    if not f.is_file():
        raise FinetuneError(f"checkpoint {path} has no {ADAPTER_WEIGHTS}")
    weights = load_file(str(f), device="cpu")
    result = set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise FinetuneError(
            f"adapter {f} does not fit this model: {len(unexpected)} tensor(s) match no module, "
            f"e.g. {unexpected[0]}")
    lora_missing = [k for k in getattr(result, "missing_keys", []) or [] if "lora_" in k and f".{adapter_name}" in k]
    if lora_missing:
        raise FinetuneError(
            f"adapter {f} does not fit this model: {len(lora_missing)} LoRA tensor(s) missing, e.g. {lora_missing[0]}")
