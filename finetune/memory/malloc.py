"""glibc malloc setting for training on the CPU.

On the CPU every activation is a malloc'd buffer. glibc serves requests below its mmap threshold
from the heap and larger ones with mmap, and by default that threshold is dynamic: it rises to the
size of each mmap'd buffer that is freed (up to 32 MiB). Either way a training step's activations
end up mostly in the heap, and from the second step on the heap has to be reused: its free space
is then in pieces (malloc_info after one step of the benchmark below: ~4.3 GB free in ~500 chunks
of 0.7-64 MB), so the heap grows to about twice what is in use, and all of it stays resident.
Fixing the threshold at glibc's own maximum gave a lower peak, measured with the cpu_vs_peers
config (SmolLM2-135M, LoRA r=16, seq 512 x 4, fp32, 2 cores), peak RSS over 4 steps, 3 runs each:
dynamic 6.18 / 6.68 / 6.49 GiB, fixed 5.95 / 5.85 / 5.99 GiB, same step times. (A low threshold,
e.g. 1 MiB, puts every activation in its own mapping: RSS close to what is in use, but a
page fault per 4 KiB of every fresh buffer, ~16 GB of fresh buffers per step: ~60% slower there.)
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the most mallopt accepts

_applied: list[int] = []


def _user_tuned() -> bool:
    """The user chose malloc settings through glibc's environment variables: leave them."""
    return bool(os.environ.get("MALLOC_MMAP_THRESHOLD_")) or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", "")


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Set glibc's mmap threshold to a fixed `nbytes` for this process (once); True if it is set.

    A no-op (False) off Linux/glibc, or when MALLOC_MMAP_THRESHOLD_ / GLIBC_TUNABLES already set it.
    """
    if _applied:
        return _applied[0] == nbytes
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc" or _user_tuned():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, int(nbytes)) != 1:
        return False
    _applied.append(int(nbytes))
    log.debug("glibc mmap threshold fixed at %d bytes", nbytes)
    return True
