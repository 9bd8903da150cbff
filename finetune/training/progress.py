"""The training progress bar: loss, lr, trained tokens/s, ETA and (on GPU) peak memory.

On a terminal it is a live rich bar; in logs (CI, SLURM, pipes) it prints a plain line every
few seconds instead, since a redrawn bar there is just noise.
"""

from __future__ import annotations

import sys
import time

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def _memory() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    return ""


class TrainProgress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, every_s: float = 10.0):
        self.total, self.start, self.enabled = total, start, enabled
        self.every_s = every_s
        self.live = enabled and sys.stdout.isatty()
        self._last_print = 0.0
        self._t0 = time.perf_counter()
        self._progress = None

    def __enter__(self):
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"), transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def update(self, step: int, loss: float, lr: float, tok_s: float) -> None:
        if not self.enabled:
            return
        mem = _memory()
        info = f"loss {loss:.4f}  lr {lr:.2e}  {tok_s:,.0f} tok/s" + (f"  mem {mem}" if mem else "")
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)
            return
        now = time.perf_counter()
        if now - self._last_print >= self.every_s or step == self.total or step == self.start + 1:
            self._last_print = now
            done = step - self.start
            eta = (now - self._t0) / done * (self.total - step) if done else 0.0
            print(f"step {step}/{self.total}  {info}  eta {eta:,.0f}s", flush=True)

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, flush=True)
