"""What a run writes besides checkpoints: Fabric loggers (CSV, TensorBoard, W&B) and loss.png."""

from __future__ import annotations

import os
from pathlib import Path

from finetune.config import Config
from finetune.errors import UsageError


def make_loggers(cfg: Config, out_dir: Path) -> list:
    from lightning.fabric.loggers import CSVLogger, TensorBoardLogger

    loggers = []
    for name in cfg.output.loggers:
        if name == "csv":
            loggers.append(CSVLogger(root_dir=str(out_dir), name="logs", version=_fresh_csv_version(out_dir / "logs")))
        elif name == "tensorboard":
            loggers.append(TensorBoardLogger(root_dir=str(out_dir), name="tensorboard", version=""))
        elif name == "wandb":
            try:
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if state.losses:
        ax.plot(*zip(*state.losses), label="train")
    if state.val_losses:
        ax.plot(*zip(*state.val_losses), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per trained token)")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
