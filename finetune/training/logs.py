"""What a run writes besides checkpoints: Fabric loggers (the run's metrics history as CSV, TensorBoard,
W&B, MLflow) and loss.png."""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import sys
import time
from pathlib import Path
from typing import Optional

from lightning.fabric.loggers import Logger, TensorBoardLogger
from lightning.fabric.utilities.rank_zero import rank_zero_only
from matplotlib.figure import Figure

from finetune.config import Config, to_dict
from finetune.errors import UsageError
from finetune.fs import atomic_write, describe_write_error
from finetune.resources import install_hint

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
                             f"{install_hint(extra)}, or drop it: output.loggers=[csv]")


def make_loggers(cfg: Config, out_dir: Path) -> list:
    """Fabric loggers for output.loggers, writing under out_dir."""
    check_loggers(cfg.output.loggers)
    run_name = cfg.output.run_name or out_dir.resolve().name
    loggers = []
    for name in cfg.output.loggers:
        if name == "csv":
            loggers.append(HistoryCSV(out_dir))
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
        if not isinstance(logger, HistoryCSV):
            logger.log_hyperparams(params)


class HistoryCSV(Logger):
    """out_dir/logs/metrics.csv: ONE history per run, kept across resumes (Lightning's CSVLogger
    deletes an existing metrics.csv, and a second file per resume is one nobody finds).

    Rows are buffered and written (the whole file, written beside it and renamed) by `save`, which
    the loop calls before every checkpoint: the file then holds every step up to the checkpoint a
    resume starts from. `start_at(step)` drops rows past that step (a kill -9 or SIGTERM after the
    checkpoint: those steps are trained, and logged, again). A failed write (disk full) keeps the
    file as it was and the rows in memory for the next save, with one warning. Between checkpoints
    the rows are also written every `flush_seconds`, so a long run without step checkpoints can be
    watched (rows past the checkpoint a resume starts from are dropped then, as above).
    """

    flush_seconds = 30.0

    def __init__(self, out_dir: Path):
        super().__init__()
        self.path = Path(out_dir) / "logs" / "metrics.csv"
        self._rows: list[dict] = []
        self._warned = False
        self._saved_at = time.monotonic()

    @property
    def name(self) -> str:
        return "logs"

    @property
    def version(self) -> str:
        return ""

    @property
    def root_dir(self) -> str:
        return str(self.path.parent)

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
        row["step"] = step if step is not None else len(self._rows)
        self._rows.append(row)
        if time.monotonic() - self._saved_at >= self.flush_seconds:
            self.save()

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass  # the checkpoints' config.yaml holds them

    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="", encoding="utf-8") as f:
            return [{k: v for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]

    def _write(self, rows: list[dict]) -> None:
        keys = sorted({k for r in rows for k in r})
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.path, text.getvalue())

    @rank_zero_only
    def start_at(self, step: int) -> None:
        """The history of the run this process continues from `step` (0: a fresh run)."""
        rows = self._read()
        kept = [r for r in rows if float(r.get("step", 0)) <= step]
        if len(kept) != len(rows):
            self._write(kept)

    @rank_zero_only
    def save(self) -> None:
        self._saved_at = time.monotonic()
        if not self._rows:
            return
        try:
            self._write(self._read() + self._rows)
        except OSError as e:
            if not self._warned:
                print(f"warning: could not write {self.path} ({describe_write_error(e)}); its rows are kept "
                      "and written with the next checkpoint", file=sys.stderr, flush=True)
                self._warned = True
            return
        self._rows = []

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()


def history(fabric) -> Optional[HistoryCSV]:
    return next((lg for lg in fabric.loggers if isinstance(lg, HistoryCSV)), None)


def flush_history(fabric) -> None:
    """Write the buffered metrics rows: before every checkpoint, so a resume finds its steps' rows."""
    h = history(fabric)
    if h is not None:
        h.save()


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
