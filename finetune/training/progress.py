"""The training progress bar: loss, lr, trained tokens/s, ETA and (on GPU) peak memory.

On a terminal it is a live rich bar; in logs (CI, SLURM, pipes) it prints a plain line every
few seconds instead (finetune.progress, shared with eval), since a redrawn bar there is just noise.
"""

from __future__ import annotations

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from finetune.progress import PlainLines, on_terminal


def _memory() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    return ""


class TrainProgress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, every_s: float = 10.0):
        self.total, self.start, self.enabled = total, start, enabled
        self.live = enabled and on_terminal()
        self._lines = PlainLines(total, "step ", start=start, every_s=every_s)
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
        self._lines.update(step, info)

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, flush=True)
