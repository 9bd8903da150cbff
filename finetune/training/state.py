"""A run's resumable state: where a run resumes from, and what a checkpoint of it holds.

`resume_source` is the one resume decision (resume=no | auto | PATH against out_dir). A checkpoint
(written by finetune.training.checkpoint, complete or invisible) holds the adapter and, in
training_state.pt, the optimizer and schedule state, the step, the loss history and every RNG
that shapes the run, so a resumed run continues exactly where the saved one stopped.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from finetune import manifest
from finetune.config import Config, to_yaml
from finetune.errors import UsageError
from finetune.fs import check_out_dir, foreign_files
from finetune.training import checkpoint
from finetune.training.changes import apply_schedule, data_comment, fresh_hyperparameters, history_comments
from finetune.training.distributed import CheckpointState

# What a refusal to train into a non-empty out_dir suggests.
RESUME_HINT = ("pass resume=auto to continue or overwrite=true to start a new run there (the earlier one is "
               "moved aside, nothing is deleted)")


def resume_source(out_dir: Path | str, resume: str, overwrite: bool) -> Optional[Path]:
    """The checkpoint a run continues from, or None to start at step 0.

    - resume=no: a fresh run; a non-empty out_dir is refused unless overwrite=true.
    - resume=auto: out_dir/final when it is complete and no step checkpoint is newer (the caller
      trains on from it when train.max_steps grew), else the newest complete step checkpoint in
      out_dir, else None. Refuses an out_dir holding files a run did not write. First finishes or undoes a save that a kill
      interrupted, so only rank 0 calls it, after launch.
    - resume=PATH: that checkpoint, which must be complete and hold training state; into a
      non-empty out_dir only when it is one of out_dir's own checkpoints or with overwrite=true.

    Nothing is ever deleted. resume=no and resume=PATH only check, so every process can ask them
    before launch.
    """
    out_dir = Path(out_dir)
    if resume == "no":
        check_run_dir(out_dir)  # first: resume/overwrite would not help with a folder of user files
        check_out_dir(out_dir, overwrite, hint=RESUME_HINT)
        return None
    if resume == "auto":
        check_run_dir(out_dir)
        checkpoint.recover(out_dir)
        final, latest = out_dir / "final", checkpoint.latest_checkpoint(out_dir)
        # A run extended past its final/ (larger train.max_steps) may have newer step checkpoints.
        done = checkpoint.saved_step(final)
        if checkpoint.is_complete(final) and (latest is None or done is None or checkpoint.saved_step(latest) <= done):
            return final
        if latest is None:
            _refuse_if_all_corrupt(out_dir)
        return latest
    path = Path(resume)
    if not checkpoint.is_complete(path):
        raise UsageError(f"resume={resume} is not a complete checkpoint directory")
    if not (path / checkpoint.STATE_FILE).is_file():
        raise UsageError(f"resume={resume} has no {checkpoint.STATE_FILE} (an adapter-only save cannot be resumed)")
    # Resuming another run's checkpoint into a third, non-empty folder would mix two runs.
    own = path.resolve().parent == out_dir.resolve()
    check_out_dir(out_dir, overwrite or own, hint=f"{resume} is not one of its checkpoints; pick an empty "
                                                  "out_dir or pass overwrite=true (nothing is deleted)")
    check_run_dir(out_dir)
    return path


def set_aside_earlier_run(out_dir: Path | str, resume: str) -> Optional[Path]:
    """overwrite=true starts a new run in out_dir: what an earlier run left there (checkpoints,
    final/, logs, loss.png, eval/) is moved, whole, to a sibling OUT.replaced-TIME folder before
    the new run starts, and one line says where. So out_dir holds one run, and a later
    resume=auto can only find this run's checkpoints. Called once, by the launching process,
    under out_dir's lock and after `resume_source` accepted the folder. Returns the new folder."""
    out_dir = Path(out_dir)
    if resume != "no" and Path(resume).resolve().parent == out_dir.resolve():
        return None  # resuming one of out_dir's own checkpoints: the same run
    earlier = foreign_files(out_dir, lambda n: False)
    if not earlier:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside = out_dir.with_name(f"{out_dir.name}.replaced-{stamp}")
    n = 2
    while aside.exists():
        aside = out_dir.with_name(f"{out_dir.name}.replaced-{stamp}-{n}")
        n += 1
    aside.mkdir()
    for name in earlier:
        os.rename(out_dir / name, aside / name)
    checkpoint.say(f"overwrite=true: moved the earlier run in {out_dir} ({', '.join(earlier[:4])}"
                   f"{', ...' if len(earlier) > 4 else ''}) to {aside}; delete it when you no longer need it")
    return aside


def _refuse_if_all_corrupt(out_dir: Path) -> None:
    """resume=auto with checkpoints that all fail their checks must not quietly start at step 0
    (and then replace them): say so, naming the newest and what is wrong with it."""
    saved = sorted((p for p in out_dir.iterdir() if p.is_dir() and (p.name == "final" or checkpoint.STEP_RE.match(p.name))
                    and (p / checkpoint.MARKER).exists()), key=lambda p: (p.name == "final", p.name)) \
        if out_dir.is_dir() else []
    if saved:
        newest = saved[-1]
        raise UsageError(f"resume=auto: every checkpoint in {out_dir} is corrupt ({len(saved)}; newest: "
                         f"{manifest.problem(newest)}); nothing to resume from. Move them away or pass "
                         "resume=no overwrite=true to start again")


# What a run writes into its out_dir (finetune.training.logs names the logger folders).
RUN_NAMES = {"final", "logs", "loss.png", "eval", "tensorboard", "wandb"}


def _is_run_part(name: str) -> bool:
    return name in ("final", "logs") or bool(checkpoint.STEP_RE.match(name))


def check_run_dir(out_dir: Path) -> None:
    """Refuse to train into a folder holding files a run did not write (resume=auto or
    overwrite=true would otherwise train into, say, a home directory, or replace a user's
    loss.png). Without a checkpoint or logs of a run in it, nothing in it is a run's."""
    names = foreign_files(out_dir, lambda n: False)
    if not names:
        return
    run = any(_is_run_part(n) for n in names)

    def ours(n: str) -> bool:
        return n.startswith((checkpoint.TMP_PREFIX, checkpoint.OLD_PREFIX)) or (
            run and (n in RUN_NAMES or bool(checkpoint.STEP_RE.match(n))))

    foreign = foreign_files(out_dir, ours)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UsageError(f"out_dir {out_dir} holds files finetune did not write: {shown}; move them away "
                         "or choose another out_dir (nothing was changed)")


@dataclass
class RunState:
    step: int = 0
    losses: list = field(default_factory=list)  # (step, train loss) for the loss curve
    val_losses: list = field(default_factory=list)
    history: list = field(default_factory=list)  # {step, changes} per resume that changed the schedule


@dataclass
class Saver:
    """Saves and restores the run's checkpoints. Every rank calls `save`: under FSDP the adapter and
    optimizer state are gathered collectively to rank 0, which writes; the others wait until it is
    complete. Every rank calls `restore` too, each reading the same files."""

    fabric: object
    cfg: Config
    model: nn.Module  # the PeftModel (its config and save_pretrained)
    tokenizer: object
    lossmod: nn.Module  # what Fabric wrapped (FSDP's shards live here)
    optimizer: object
    scheduler: object
    ckpt_state: CheckpointState
    data_fingerprint: str = ""  # recorded in config.yaml: a resume on other data is refused

    def save(self, path: Path, state: RunState) -> None:
        adapter = self.ckpt_state.adapter_weights(self.lossmod)
        optim = self.ckpt_state.optimizer_state(self.lossmod, self.optimizer)
        if self.fabric.global_rank == 0:
            checkpoint.save_checkpoint(
                path, model=self.model, tokenizer=self.tokenizer,
                config_yaml=to_yaml(self.cfg) + history_comments(state.history) + data_comment(self.data_fingerprint),
                adapter_weights=adapter,
                state={"optimizer": optim, "scheduler": self.scheduler.state_dict(), "step": state.step,
                       "losses": state.losses, "val_losses": state.val_losses, "rng": capture_rng(),
                       "history": state.history})
        self.fabric.barrier()

    def save_step(self, state: RunState) -> Path:
        """out_dir/step-NNNNNN, then the oldest step checkpoints beyond train.keep_last go."""
        out_dir = Path(self.cfg.out_dir)
        path = checkpoint.step_dir(out_dir, state.step)
        self.save(path, state)
        if self.fabric.global_rank == 0 and self.cfg.train.keep_last:
            checkpoint.prune(out_dir, self.cfg.train.keep_last)
        return path

    def restore(self, path: Path, state: RunState, changes: Optional[dict] = None) -> None:
        """Optimizer, schedule, step, losses and RNG from `path` (the adapter weights are loaded
        before Fabric's setup, as whole tensors: see checkpoint.load_adapter_weights). `changes`
        are the schedule fields this run changed (finetune.training.changes): their new values
        replace the restored ones, and the change is recorded in the run's history."""
        saved = checkpoint.load_state(path)
        fresh = fresh_hyperparameters(self.optimizer)
        self.ckpt_state.load_optimizer_state(self.lossmod, self.optimizer, saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        state.step = int(saved["step"])
        state.losses = [tuple(x) for x in saved.get("losses", [])]
        state.val_losses = [tuple(x) for x in saved.get("val_losses", [])]
        state.history = list(saved.get("history", []))
        if changes:
            apply_schedule(self.optimizer, self.scheduler, fresh)
            state.history.append({"step": state.step, "changes": changes})
        restore_rng(saved["rng"])


# --------------------------------------------------------------------------- RNG


def capture_rng() -> dict:
    """Every RNG that shapes a run (python, numpy, torch CPU, CUDA), as weights_only-safe values."""
    version, internal, gauss = random.getstate()
    out: dict[str, Any] = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                    "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict) -> None:
    """Set every RNG `capture_rng` recorded (CUDA: as many devices as both runs have)."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    if state.get("cuda") and torch.cuda.is_available():
        saved = list(state["cuda"])
        count = torch.cuda.device_count()
        if len(saved) != count:
            checkpoint.say(f"warning: checkpoint has CUDA RNG states for {len(saved)} device(s), this run sees "
                           f"{count}; restoring the first min() of them")
        for i in range(min(len(saved), count)):
            torch.cuda.set_rng_state(saved[i], i)
