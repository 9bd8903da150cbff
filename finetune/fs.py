"""Filesystem policy, in one place: the cache root, the out_dir rule, and writes that are
complete or invisible (written beside the target, then renamed into place).

Training checkpoints add checksums and a COMPLETE marker on top (finetune.training.checkpoint);
everything else a command writes goes through `atomic_out_dir` (a directory of outputs) or
`atomic_write` / `atomic_file` (one file).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, Union

from finetune.errors import UsageError

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where converted/generated models are cached: $FINETUNE_CACHE or ~/.cache/finetune."""
    root = os.environ.get("FINETUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "finetune")
    return Path(root)


def check_out_dir(out_dir: str | Path, overwrite: bool,
                  hint: str = "pass overwrite=true or choose another out_dir") -> Path:
    """The out_dir rule every command keeps: never write into a non-empty out_dir unless told to.

    Nothing is deleted here or later: overwrite=true only lets files of the same name be replaced.
    `hint` is what the one-line refusal suggests (training adds resume=auto).
    """
    out = Path(os.path.expanduser(str(out_dir)))
    if out.exists() and not out.is_dir():
        raise UsageError(f"out_dir {out_dir} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"out_dir {out_dir} is not empty; {hint}")
    return out


def _umask_mode(full: int) -> int:
    """`full` (0o777 or 0o666) less the process umask: what a plain mkdir/open would have given.
    mkdtemp/mkstemp create 0700/0600, which would otherwise stick to the renamed result."""
    mask = os.umask(0)
    os.umask(mask)
    return full & ~mask


def follow_umask(root: Path) -> None:
    """Give `root` and everything under it the modes a plain mkdir/open would have: writers that
    go through mkstemp (safetensors shards in transformers 5) leave 0600 files, unreadable to a
    serving container running as another user."""
    dirs, files = _umask_mode(0o777), _umask_mode(0o666)
    root.chmod(dirs)
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod(dirs if path.is_dir() else files)


@contextlib.contextmanager
def atomic_out_dir(out_dir: Union[str, Path], overwrite: bool) -> Iterator[Path]:
    """Yield a temp dir next to out_dir; on success it becomes out_dir (rename), else it is removed.

    With overwrite into an existing dir, files are moved in one by one (same names replaced, any
    other user files left alone) since a directory cannot be atomically swapped over a non-empty one.
    """
    out = check_out_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        follow_umask(tmp)
        if not out.exists() or not any(out.iterdir()):
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
            return
        stale = sorted(p.name for p in out.iterdir() if not (tmp / p.name).exists())
        for item in tmp.iterdir():
            target = out / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
        tmp.rmdir()
        if stale:
            log.warning("out_dir %s keeps files not written by this run: %s", out, ", ".join(stale))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: Union[str, Path]) -> Iterator[BinaryIO]:
    """A binary file open beside `path`; when the block ends without error it is flushed to disk
    and renamed over `path`, otherwise removed. For writers that stream (np.savez, savefig)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _umask_mode(0o666))
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: Union[str, Path], data: Union[str, bytes]) -> Path:
    """Write `data` to `path` so that a reader (or a crash) sees the old file or the new, never half."""
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)
