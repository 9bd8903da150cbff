"""Progress a log can show: plain lines every few seconds when stdout is not a terminal.

A live bar (rich in training, tqdm in eval) redraws itself on a terminal; in a log (CI, SLURM, a
pipe, `| tee`) it is either noise or, disabled, nothing at all for the whole run. Training and eval
both print these lines there instead. Kept at the package root, free of torch and of either stage,
so both can import it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator, Optional


def on_terminal() -> bool:
    """True when progress can be a live bar: stdout is a terminal."""
    return sys.stdout.isatty()


class PlainLines:
    """`{prefix}{done}/{total} {unit}  {rate} {unit}/s  {info}  eta {s}s`, printed at the first
    update, then at most every `every_s` seconds, and always at the last one."""

    def __init__(self, total: int, prefix: str, unit: str = "", start: int = 0, every_s: float = 10.0):
        self.total, self.prefix, self.unit, self.start, self.every_s = total, prefix, unit, start, every_s
        self._t0 = time.perf_counter()
        self._last: Optional[float] = None

    def update(self, done: int, info: str = "") -> None:
        now = time.perf_counter()
        if self._last is not None and now - self._last < self.every_s and done < self.total:
            return
        self._last = now
        print(self.line(done, now - self._t0, info), flush=True)

    def line(self, done: int, elapsed: float, info: str = "") -> str:
        n = done - self.start
        parts = [f"{self.prefix}{done}/{self.total}" + (f" {self.unit}" if self.unit else "")]
        if self.unit and elapsed > 0:
            parts.append(f"{n / elapsed:,.1f} {self.unit}/s")
        if info:
            parts.append(info)
        eta = elapsed / n * (self.total - done) if n > 0 else 0.0
        parts.append(f"eta {eta:,.0f}s")
        return "  ".join(parts)


# --------------------------------------------------------------------------- what an interruption stops

_STOPPED: list[tuple[str, str]] = []  # the innermost step an interruption unwound through


@contextlib.contextmanager
def doing(what: str, left: str) -> Iterator[None]:
    """Name the long step running now and what a Ctrl-C during it leaves behind, so the CLI's
    'interrupted' line says both (data preparation, a merge, an evaluation)."""
    try:
        yield
    except KeyboardInterrupt:
        if not _STOPPED:  # the innermost step unwinds first
            _STOPPED.append((what, left))
        raise


def interrupted_line(signal_name: str = "Ctrl-C") -> str:
    """The one line for an interruption: what was running and what is left of it."""
    if not _STOPPED:
        return f"interrupted ({signal_name})"
    what, left = _STOPPED.pop()
    _STOPPED.clear()
    return f"interrupted ({signal_name}) while {what}: {left}"
