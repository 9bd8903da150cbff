"""Filesystem policy, in one place: the cache root, the out_dir rule, and writes that are
complete or invisible (written beside the target, then renamed into place).

Training checkpoints add checksums and a COMPLETE marker on top (finetune.training.checkpoint);
everything else a command writes goes through `atomic_out_dir` (a directory of outputs) or
`atomic_write` / `atomic_file` (one file).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Optional, Union

from finetune.errors import FinetuneError, UsageError

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where converted/generated models are cached: $FINETUNE_CACHE or ~/.cache/finetune.

    Always absolute: adapters record the base's path, and a relative one would only resolve from
    the directory the run happened to start in."""
    root = os.environ.get("FINETUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "finetune")
    return Path(os.path.abspath(os.path.expanduser(root)))


def cache_error(e: BaseException) -> Optional[str]:
    """The one line for an OSError raised while writing under the cache root (say an unwritable
    HOME), naming the setting that moves it; None for any other error."""
    name = getattr(e, "filename", None)
    if not isinstance(e, OSError) or not name:
        return None
    root = cache_root()
    if not (Path(os.path.abspath(str(name))) == root or root in Path(os.path.abspath(str(name))).parents
            or Path(os.path.abspath(str(name))) in root.parents):
        return None
    return (f"cache directory {root} is not writable ({e.strerror or type(e).__name__}: {name}); "
            "set FINETUNE_CACHE to a writable directory")


def check_out_dir(out_dir: str | Path, overwrite: bool,
                  hint: str = "pass overwrite=true or choose another out_dir", whole: bool = False) -> Path:
    """The out_dir rule every command keeps: never write into a non-empty out_dir unless told to.

    Nothing is deleted here: overwrite=true lets a later write replace what is there. `whole` is
    for commands that replace out_dir whole (`atomic_out_dir`: merge, moe, export): their
    overwrite=true is refused when out_dir holds files no finetune command wrote, since those
    would go. `hint` is what the one-line refusal suggests (training adds resume=auto).
    """
    if out_dir is None or not str(out_dir).strip():
        raise UsageError("out_dir is empty: give the directory to write, e.g. out_dir=out/run")
    out = Path(os.path.expanduser(str(out_dir)))
    if out.exists() and not out.is_dir():
        raise UsageError(f"out_dir {out_dir} exists and is not a directory")
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):
        if not overwrite:
            raise UsageError(f"out_dir {out_dir} is not empty; {hint}")
        if whole:
            foreign = foreign_files(out, _written_by_us(out))
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                raise UsageError(f"out_dir {out_dir} holds files finetune did not write: {shown}; overwrite=true "
                                 "replaces out_dir whole, so move them away or choose another out_dir "
                                 "(nothing was changed)")
    return out


# What a whole-folder output lists of itself (atomic_out_dir writes it), so overwrite=true knows
# which files it may replace; folders written before it existed are recognised by their names.
OUTPUT_MARKER = ".finetune-output"
_OUTPUT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.json", "*.gguf", "Modelfile", "README.md",
                    "*.jinja", "tokenizer.model", "merges.txt", "vocab.txt", "routing.png",
                    "mergekit_moe_config.yml")


def _written_by_us(out: Path):
    try:
        listed = set(json.loads((out / OUTPUT_MARKER).read_text()))
    except (OSError, ValueError, TypeError):
        listed = set()

    def own(name: str) -> bool:
        return (name == OUTPUT_MARKER or name in listed
                or any(fnmatch.fnmatch(name, pat) for pat in _OUTPUT_PATTERNS))
    return own


def check_out_file(path: Union[str, Path], overwrite: bool, inputs: Iterable[tuple[str, Optional[str]]] = (),
                   what: str = "dump") -> Path:
    """The out-path rule for a command's single output file (`finetune data dump=PATH`): never
    one of the command's inputs (overwrite=true or not), never an existing file without
    overwrite=true, never a folder, FIFO or device; its folder must be writable. Checked before
    any work; the write itself goes through `atomic_file` (written beside, then renamed)."""
    if path is None or not str(path).strip():
        raise UsageError(f"{what}= is empty: give a file path such as {what}=out/train.jsonl")
    out = Path(os.path.expanduser(str(path)))
    if out.is_dir():
        raise UsageError(f"{what}={path} is a folder; give a file path such as {out / 'train.jsonl'}")
    check_apart(out, inputs, name=f"{what}=")
    if out.exists() or out.is_symlink():
        if not out.is_file():
            raise UsageError(f"{what}={path} exists and is not a regular file (a FIFO, device or broken link); "
                             "give a file path")
        if not overwrite:
            raise UsageError(f"{what}={path} exists; pass overwrite=true to replace it or choose another path")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK)):
        raise UsageError(f"{what}={path}: cannot write into {parent}")
    return out


# --------------------------------------------------------------------------- one run per out_dir

LOCK_NAME = ".finetune.lock"
_HELD: dict[str, int] = {}  # lock files this process holds -> nesting depth


def launcher_rank0() -> bool:
    """True in the process that becomes global rank 0 (or runs alone): the one that locks.
    Processes started by a launcher (Lightning's, torchrun) carry their rank in the environment."""
    for var in ("RANK", "NODE_RANK", "LOCAL_RANK"):
        value = os.environ.get(var, "0")
        if value.isdigit() and int(value) > 0:
            return False
    return True


def _make_dir(out: Path, out_dir) -> bool:
    """Create out (and parents) as a command would; one line instead of a raw OSError. True if created."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"out_dir {out_dir} exists and is not a directory")
    if out.is_dir():
        return False
    try:
        out.mkdir(parents=True)
    except OSError as e:
        raise UsageError(f"out_dir {out_dir} cannot be created: {e.strerror or e}") from None
    return True


@contextlib.contextmanager
def out_dir_lock(out_dir: Union[str, Path]) -> Iterator[Path]:
    """Hold an exclusive lock on out_dir for as long as the block runs: one run per out_dir.

    A flock on out_dir/.finetune.lock, which the kernel releases when the process ends however it
    ends (kill -9 too), so a stale lock file never blocks anyone. A second run is refused (exit 2)
    naming the holder. Creating the lock file is also the check that out_dir is creatable and
    writable, before any data or model is loaded. Nested calls in one process share the lock;
    processes of a multi-process run other than rank 0 do not lock (rank 0 holds it for them).
    """
    out = Path(os.path.expanduser(str(out_dir)))
    path = out / LOCK_NAME
    key = os.path.abspath(path)
    if not launcher_rank0() or key in _HELD:
        _HELD[key] = _HELD.get(key, 0) + 1
        try:
            yield out
        finally:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]
        return
    created_dir = _make_dir(out, out_dir)
    fd, created_file = _acquire(path, out_dir)
    _HELD[key] = 1
    try:
        yield out
    finally:
        del _HELD[key]
        # Our own lock file goes (while still locked; a process that opened it meanwhile sees the
        # inode change and retries), and so does an out_dir that this block created and left empty.
        with contextlib.suppress(OSError):
            if created_file:
                path.unlink()
            if created_dir and not any(out.iterdir()):
                out.rmdir()
        os.close(fd)


def _acquire(path: Path, out_dir) -> tuple[int, bool]:
    while True:
        existed = path.exists()
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, _umask_mode(0o666))
        except OSError as e:
            raise UsageError(f"out_dir {out_dir} is not writable: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise UsageError(f"out_dir {out_dir}: cannot lock {path}: {e.strerror or e}") from None
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "holder unknown"
            os.close(fd)
            raise UsageError(f"out_dir {out_dir} is in use by another run ({holder}); wait for it to end "
                             "or choose another out_dir") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed it between our open and flock: take the new one
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode(), 0)
    return fd, not existed


def foreign_files(out_dir: Union[str, Path], own: "callable") -> list[str]:
    """Names in out_dir that `own(name)` does not claim (sorted): files some other program or
    person put there, which resume=auto / overwrite=true must not train into."""
    out = Path(os.path.expanduser(str(out_dir)))
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME and not own(p.name))


def check_apart(out_dir: Union[str, Path], inputs: Iterable[tuple[str, Optional[Union[str, Path]]]],
                name: str = "out_dir ") -> None:
    """Refuse an output that is, contains or is inside one of the command's inputs, overwrite or
    not: writing there would replace (or bury) what the command reads. `inputs` are (what, path)
    pairs; hub ids and other paths that do not exist here are not local inputs and are skipped."""
    out = Path(os.path.abspath(os.path.expanduser(str(out_dir))))
    out_real = Path(os.path.realpath(out))
    for what, path in inputs:
        if not path or not os.path.exists(os.path.expanduser(str(path))):
            continue
        p = Path(os.path.realpath(os.path.expanduser(str(path))))
        if p == out_real:
            rel = "is"
        elif p in out_real.parents:
            rel = "is inside"
        elif out_real in p.parents:
            rel = "contains"
        else:
            continue
        raise UsageError(f"{name}{out_dir} {rel} the {what} {path}; write outputs apart from the inputs "
                         "(overwrite=true does not change this)")


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
    """Yield a temp dir next to out_dir; on success it becomes out_dir, else it is removed.

    out_dir is replaced whole: with overwrite=true what was there goes (moved aside into a
    hidden temp dir first, deleted once the new files are in), so a folder never mixes an earlier
    model's files with this one's (an old model.safetensors beside new shards would load first).
    Files no finetune command wrote are refused up front (`check_out_dir(whole=True)`). A lock
    file (`out_dir_lock`, which callers hold around the whole command) stays where it is.
    """
    out = check_out_dir(out_dir, overwrite, whole=True)
    _make_dir(out.parent, out.parent)
    prefix = f".{out.name}.tmp-"
    sweep_stale_dirs(out.parent, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    # Locked while we write: a later command sweeps it only once we are gone (flock ends with us).
    held = os.open(tmp, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        with _sigterm_unwinds():
            yield tmp
            (tmp / OUTPUT_MARKER).write_text(json.dumps(sorted(p.name for p in tmp.iterdir())) + "\n")
            follow_umask(tmp)
            _replace_whole(tmp, out, prefix)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        os.close(held)


def _replace_whole(tmp: Path, out: Path, prefix: str) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    earlier = [p for p in out.iterdir() if p.name != LOCK_NAME]
    if not earlier and not (out / LOCK_NAME).exists():
        out.rmdir()
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=prefix + "old-", dir=out.parent))  # swept like tmp if we die here
    held = os.open(old, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        for item in earlier:
            os.replace(item, old / item.name)
        for item in tmp.iterdir():
            os.replace(item, out / item.name)
        tmp.rmdir()
    finally:
        shutil.rmtree(old, ignore_errors=True)
        os.close(held)
    if earlier:
        log.warning("out_dir %s: replaced its earlier contents (%d file(s)/folder(s), overwrite=true)",
                    out, len(earlier))


def sweep_stale_dirs(parent: Path, prefix: str) -> list[str]:
    """Remove `prefix*` temp dirs in parent that no live writer holds (their flock is free): what
    a killed command left behind, e.g. a half-written 14 GB merge. Returns the removed names."""
    removed = []
    if not parent.is_dir():
        return removed
    for p in sorted(parent.iterdir()):
        if not p.name.startswith(prefix) or p.is_symlink() or not p.is_dir():
            continue
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a live writer holds it
        try:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
        finally:
            os.close(fd)
    if removed:
        log.warning("removed leftovers of an interrupted write in %s: %s", parent, ", ".join(removed))
    return removed


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM inside the block raises SystemExit(143), so `finally` clauses (the temp dir's
    removal) run instead of the process vanishing mid-write."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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


def describe_write_error(exc: BaseException) -> str:
    """One phrase for why a write failed; a full disk is named as such whatever layer raised it
    (safetensors and torch wrap the OSError in their own errors)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            return f"disk full ({os.strerror(seen.errno)})"
        text = str(seen)
        if "No space left" in text or "os error 28" in text:
            return "disk full (No space left on device)"
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    return f"{type(exc).__name__}: {exc}"


def is_write_failure(exc: BaseException) -> bool:
    """An OSError, or a library's error that wraps one (a full disk under safetensors)."""
    return isinstance(exc, OSError) or describe_write_error(exc).startswith("disk full")


@contextlib.contextmanager
def write_error(what: Union[str, Path], hint: str = "free space and run the command again") -> Iterator[None]:
    """A failed write of `what` (disk full, a read-only or vanished folder) as one line (exit 1)
    saying nothing was left there; other errors pass through."""
    try:
        yield
    except Exception as e:
        if not is_write_failure(e):
            raise
        raise FinetuneError(f"could not write {what}: {describe_write_error(e)}; nothing was written there "
                            f"({hint})") from e


CACHE_HINT = "free space, or set FINETUNE_CACHE to a folder on another disk"


def atomic_write(path: Union[str, Path], data: Union[str, bytes]) -> Path:
    """Write `data` to `path` so that a reader (or a crash) sees the old file or the new, never half."""
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)
