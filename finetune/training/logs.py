"""What a run writes besides checkpoints: Fabric loggers (CSV, TensorBoard, W&B) and loss.png."""

from __future__ import annotations

import io
from pathlib import Path

from lightning.fabric.loggers import CSVLogger, TensorBoardLogger
from matplotlib.figure import Figure

from finetune.config import Config
from finetune.errors import UsageError
from finetune.fs import atomic_write


def make_loggers(cfg: Config, out_dir: Path) -> list:
    """Fabric loggers for output.loggers, writing under out_dir."""
    loggers = []
    for name in cfg.output.loggers:
        if name == "csv":
            loggers.append(CSVLogger(root_dir=str(out_dir), name="logs", version=_fresh_csv_version(out_dir / "logs")))
        elif name == "tensorboard":
            loggers.append(TensorBoardLogger(root_dir=str(out_dir), name="tensorboard", version=""))
        elif name == "wandb":
            try:  # optional: wandb (and lightning.pytorch) only for runs that log there
                from lightning.pytorch.loggers import WandbLogger
            except ImportError:
                raise UsageError("output.loggers has wandb but wandb/lightning.pytorch is not installed") from None
            loggers.append(WandbLogger(save_dir=str(out_dir), project="finetune"))
        else:
            raise UsageError(f"output.loggers: unknown logger '{name}' (csv, tensorboard, wandb)")
    return loggers


def _fresh_csv_version(logs: Path) -> str:
    """Lightning's CSV logger deletes an existing metrics.csv in its folder; a resumed (or
    overwrite=true) run writes logs/run-N/metrics.csv instead, so earlier history survives."""
    if not (logs / "metrics.csv").exists():
        return ""
    n = 2
    while (logs / f"run-{n}").exists():
        n += 1
    return f"run-{n}"


def logger_flush(fabric) -> None:
    for logger in fabric.loggers:
        logger.finalize("success")


def plot_losses(state, path: Path) -> None:
    """loss.png: training loss per step, validation loss where it was measured (state: a RunState)."""
    # A bare Figure, not pyplot: no GUI backend and no process-wide figure state to switch or close.
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    if state.losses:
        ax.plot(*zip(*state.losses), label="train")
    if state.val_losses:
        ax.plot(*zip(*state.val_losses), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per trained token)")
    if state.losses or state.val_losses:  # an empty legend only warns (train.max_steps=0)
        ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    atomic_write(path, png.getvalue())
