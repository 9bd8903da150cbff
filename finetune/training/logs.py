"""What a run writes besides checkpoints: Fabric loggers (CSV, TensorBoard, W&B, MLflow) and loss.png."""

from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path

from lightning.fabric.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.fabric.utilities.rank_zero import rank_zero_only
from matplotlib.figure import Figure

from finetune.config import Config, to_dict
from finetune.errors import UsageError
from finetune.fs import atomic_write

# logger -> (modules any one of which it needs, the extra that installs one)
_NEEDS = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
          "wandb": (("wandb",), "wandb"),
          "mlflow": (("mlflow",), "mlflow")}


def check_loggers(names) -> None:
    """UsageError naming the extra to install when a logger's package is missing; costs no import,
    so it can run before any work starts."""
    for name in names:
        modules, extra = _NEEDS.get(name, ((), ""))
        if modules and not any(importlib.util.find_spec(m) for m in modules):
            raise UsageError(f"output.loggers has {name} but the {modules[0]} package is not installed: "
                             f"pip install 'finetune[{extra}]', or drop it: output.loggers=[csv]")


def make_loggers(cfg: Config, out_dir: Path) -> list:
    """Fabric loggers for output.loggers, writing under out_dir."""
    check_loggers(cfg.output.loggers)
    run_name = cfg.output.run_name or out_dir.resolve().name
    loggers = []
    for name in cfg.output.loggers:
        if name == "csv":
            loggers.append(CSVLogger(root_dir=str(out_dir), name="logs", version=_fresh_csv_version(out_dir / "logs")))
        elif name == "tensorboard":
            loggers.append(TensorBoardLogger(root_dir=str(out_dir), name="tensorboard", version=""))
        elif name == "wandb":
            # lightning.pytorch's loggers also speak Fabric's Logger interface. W&B's own settings
            # (WANDB_MODE=offline, WANDB_DIR, ...) apply as usual.
            from lightning.pytorch.loggers import WandbLogger
            loggers.append(WandbLogger(save_dir=str(out_dir), project=cfg.output.project, name=run_name))
        elif name == "mlflow":
            from lightning.pytorch.loggers import MLFlowLogger
            # MLFLOW_TRACKING_URI (a server, a database) wins; without it the runs go to a file
            # store in out_dir/mlruns, as Lightning does. MLflow 3 wants that opt-in spelt out
            # (its default, sqlite, needs SQLAlchemy, which mlflow-skinny lacks).
            uri = os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            loggers.append(_BuiltOnFirstUse(lambda: MLFlowLogger(
                experiment_name=cfg.output.project, run_name=run_name, tracking_uri=uri,
                save_dir=str(out_dir / "mlruns"))))
        else:
            raise UsageError(f"output.loggers: unknown logger '{name}' (csv, tensorboard, wandb, mlflow)")
    return loggers


class _BuiltOnFirstUse(Logger):
    """A logger made on rank 0 when first used. MLflow's makes its store (out_dir/mlruns) in its
    constructor; loggers are made before training checks that out_dir is empty, and on every rank."""

    def __init__(self, make):
        super().__init__()
        self._make, self._logger = make, None

    @property
    def built(self) -> Logger:
        if self._logger is None:
            self._logger = self._make()
        return self._logger

    @property
    def name(self):
        return self.built.name

    @property
    def version(self):
        return self.built.version

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        self.built.log_metrics(metrics, step)

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        self.built.log_hyperparams(params, *args, **kwargs)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._logger is not None:
            self._logger.finalize(status)


def log_config(fabric, cfg: Config, **resolved) -> None:
    """The resolved config (plus values only known at run time, e.g. an auto micro-batch) as the
    run's hyperparameters / W&B run config / MLflow params. CSV has no place for them: the
    checkpoints' config.yaml holds the same."""
    params = to_dict(cfg)
    if resolved:
        params["resolved"] = resolved
    for logger in fabric.loggers:
        if not isinstance(logger, CSVLogger):
            logger.log_hyperparams(params)


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
