"""Training: recipe -> adapter, on Lightning Fabric. setup -> main -> fit, readable top to bottom.

Invariants this file keeps (each has a test):
- loss = sum of token losses / trained tokens over all micro-batches and ranks of a step, so
  4 x micro-batch 1 equals 1 x micro-batch 4 and 2 processes equal 1;
- the data order is a function of (seed, step) only, so resume needs just the step number and
  reproduces the uninterrupted run exactly on CPU;
- a checkpoint is complete or invisible (finetune.training.checkpoint), and Ctrl-C / SIGTERM / NaN
  never cost more than the steps since the last one;
- nothing of a run stays in memory once `train` returns (what follows, e.g. the eval suite, needs it).

What a step is built from is finetune.training.build's; what is trained on, how it is batched and
normalised, the objective's (finetune.training.objectives); saving and resuming, .state's (what a
resume may change, .changes'); the lines about memory, .report's.
"""

from __future__ import annotations

import gc
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch import nn
from transformers.utils import logging as hf_logging

from finetune.config import Config, gradient_accumulation
from finetune.data.stream import BatchStream
from finetune.errors import FinetuneError
from finetune.fs import check_apart, launcher_rank0, out_dir_lock
from finetune.models.adapters import serving_note
from finetune.models.load import load_tokenizer
from finetune.runtime import resolve_precision
from finetune.training import checkpoint, report
from finetune.training.build import build_step, lr_lambda
from finetune.training.changes import check_same_data, data_fingerprint, describe, schedule_changes
from finetune.training.compile import CompileWatch, compile_line
from finetune.training.distributed import CheckpointState, make_strategy, param_bytes
from finetune.training.logs import flush_history, history, log_config, logger_flush, make_loggers, plot_losses
from finetune.training.objectives import Objective, objective_for
from finetune.training.preflight import check_run
from finetune.training.progress import TrainProgress
from finetune.training.state import RunState, Saver, resume_source, set_aside_earlier_run

# --------------------------------------------------------------------------- setup


def train(cfg: Config) -> Optional[Path]:
    """Train and return the final adapter directory on global rank 0 (None on the other ranks).

    The model, optimizer and data are released before it returns (and the GPU cache emptied), so
    the caller can load other models, e.g. to evaluate the adapter it just saved.
    """
    with out_dir_lock(cfg.out_dir):  # one run per out_dir, from before data and model load to the end
        _preflight(cfg)
        if cfg.overwrite and cfg.resume != "auto" and launcher_rank0():
            set_aside_earlier_run(cfg.out_dir, cfg.resume)  # before the loggers open their files
        fabric = make_fabric(cfg)
        fabric.launch()
        final_dir = main(fabric, cfg).final_dir
        rank0 = fabric.global_rank == 0
        del fabric
    gc.collect()  # peft and transformers modules hold reference cycles: free them now, not later
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    return final_dir if rank0 else None


def make_fabric(cfg: Config) -> L.Fabric:
    accelerator, precision = resolve_precision(cfg)
    loggers = make_loggers(cfg, Path(cfg.out_dir))
    return L.Fabric(accelerator=accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
                    strategy=make_strategy(cfg, accelerator, precision), precision=precision, loggers=loggers)


def _preflight(cfg: Config) -> None:
    """Usage checks made before fabric.launch(), by every process that will become a rank.

    After launch, a mistake seen by rank 0 alone would leave the other ranks waiting in a
    collective until the store times out; before it, no rank has started and nothing is written.
    """
    check_run(cfg)  # launcher, loggers, the model's context: before data, model and out_dir
    check_apart(cfg.out_dir, training_inputs(cfg))
    if cfg.resume != "auto":  # auto repairs out_dir: rank 0 alone does that, after launch
        resume_source(cfg.out_dir, cfg.resume, cfg.overwrite)
    if cfg.train.micro_batch_size != "auto" and cfg.devices > 0:
        gradient_accumulation(cfg, cfg.devices * cfg.num_nodes, int(cfg.train.micro_batch_size))


def training_inputs(cfg: Config) -> list[tuple[str, Optional[str]]]:
    """What a run reads from disk, which its out_dir must keep apart from (fs.check_apart)."""
    return [("base model", cfg.model.name), ("adapter", cfg.model.adapter), ("dataset file", cfg.data.path),
            ("validation file", cfg.data.val_path), ("dataset card", cfg.data.card)]


@dataclass
class TrainResult:
    final_dir: Path
    model: Optional[nn.Module] = None  # the trained peft model, for tests and notebooks
    state: Optional[RunState] = None


def main(fabric, cfg: Config) -> TrainResult:
    """One run on a launched Fabric: data, model, optimizer, resume, fit, final adapter."""
    out_dir = Path(cfg.out_dir)
    rank0 = fabric.global_rank == 0
    final_dir = out_dir / "final"

    # Rank 0 alone repairs out_dir and picks the checkpoint; the others must not look while it does.
    resume_from = fabric.broadcast(resume_source(out_dir, cfg.resume, cfg.overwrite) if rank0 else None)
    if resume_from is not None and resume_from.name == "final":
        done = checkpoint.saved_step(resume_from)
        if done is None or done >= cfg.train.max_steps:
            fabric.print(f"{final_dir} is already complete ({done} steps); nothing to resume. Raise "
                         "train.max_steps to train on, or use a new out_dir to train again.")
            return TrainResult(final_dir)
        fabric.print(f"{final_dir} has {done} steps; continuing to train.max_steps={cfg.train.max_steps}")
    # Every rank reads the same files, so all refuse together (one rank alone would leave the
    # others waiting in a collective).
    changes = schedule_changes(resume_from, cfg) if resume_from is not None else {}
    fingerprint = data_fingerprint(cfg)
    note = check_same_data(resume_from, cfg, fingerprint) if resume_from is not None else None
    _print_if(fabric, note)
    if changes:
        fabric.print(f"resume: applying changed schedule from step {checkpoint.saved_step(resume_from)}: "
                     f"{describe(changes)} (recorded in config.yaml)")
    if cfg.model.trust_remote_code:
        fabric.print("warning: model.trust_remote_code=true: running model code shipped with the checkpoint")

    fabric.seed_everything(cfg.train.seed, verbose=False)  # one less stderr line per rank
    if not rank0:  # progress bars from rank 0 only (transformers shows one while loading weights)
        hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(cfg.model)
    objective = objective_for(cfg)
    with fabric.rank_zero_first():  # rank 0 fills the tokenized cache, the others read it
        data = objective.prepare(tokenizer, progress=rank0 and cfg.output.progress)
    if rank0:
        fabric.print(str(data.stats))

    step = build_step(cfg, fabric.device, tokenizer)
    data = objective.attach(step.lossmod, data)  # e.g. DPO's reference log-probs, computed once
    micro = report.micro_batch(cfg, fabric.device)
    if cfg.train.micro_batch_size == "auto":
        fabric.print(f"train.micro_batch_size=auto -> {micro}")
    accum = gradient_accumulation(cfg, fabric.world_size, micro)
    stream = BatchStream(data.train, global_batch_size=cfg.train.global_batch_size, micro_batch_size=micro,
                         world_size=fabric.world_size, rank=fabric.global_rank, seed=cfg.train.seed,
                         group_by_length=not cfg.data.packing, pad_id=tokenizer.pad_token_id,
                         collate=objective.collate)
    val_batches = _val_batches(objective, data.val, micro, fabric, tokenizer.pad_token_id, cfg.train.eval_batches)
    n_trainable = sum(p.numel() for p in step.trainable)  # counted now: FSDP turns them into shards
    if rank0:
        log_config(fabric, cfg, micro_batch_size=micro, gradient_accumulation=accum, world_size=fabric.world_size,
                   trainable_parameters=n_trainable, train_units=len(data.train))
    _print_if(fabric, report.tiles_line(cfg.train, step.memory))
    _print_if(fabric, compile_line(step.compiled_layers, fabric.device))

    scheduler = torch.optim.lr_scheduler.LambdaLR(step.optimizer, lr_lambda(cfg))
    if resume_from is not None:  # whole tensors, before FSDP shards them
        checkpoint.load_adapter_weights(step.model, resume_from)
    ckpt_state = CheckpointState(step.lossmod, step.model, step.optimizer)  # names, while not yet wrapped
    whole = param_bytes(step.model)
    lossmod, optimizer = fabric.setup(step.lossmod, step.optimizer)
    _print_if(fabric, report.fsdp_line(lossmod, whole))

    state = RunState()
    saver = Saver(fabric, cfg, step.model, tokenizer, lossmod, optimizer, scheduler, ckpt_state, fingerprint)
    if resume_from is not None:
        saver.restore(resume_from, state, changes)
        fabric.print(f"resumed from {resume_from} at step {state.step}")
    if rank0 and history(fabric) is not None:
        history(fabric).start_at(state.step)  # rows past the checkpoint are logged again

    fabric.print(f"training {n_trainable:,} parameters; {fabric.world_size} process(es), "
                 f"micro-batch {micro} x accumulation {accum} x {fabric.world_size} = global {cfg.train.global_batch_size}")
    # SIGINT/SIGTERM from the first step to the final save: the run stops at a checkpoint.
    with _StopRequest() as stop:
        try:
            fit(fabric, cfg, objective, lossmod, optimizer, scheduler, stream, val_batches, state, saver, stop,
                CompileWatch(step.compiled_layers))
        finally:  # a NaN stop or a failed save keeps the rows of the steps that ran
            flush_history(fabric)
        fabric.print(report.peak_memory_line(cfg, fabric.device, micro))
        saver.save(final_dir, state)
        if rank0:
            if cfg.output.plot:
                plot_losses(state, out_dir / "loss.png")
            fabric.print(f"saved adapter to {final_dir}")
            _print_if(fabric, serving_note(final_dir))
        if _stopping(fabric, stop):  # asked to stop while the final adapter was saved: it is complete
            _exit_on_signal(fabric, stop, f"the final adapter {final_dir} is complete", hint=False)
    return TrainResult(final_dir, step.model, state)


def _stopping(fabric, stop) -> bool:
    stopping = stop.signal is not None
    if fabric.world_size > 1:  # ranks may get the signal a step apart; all must stop at the same one
        flag = torch.tensor(int(stopping), device=fabric.device)
        stopping = fabric.all_reduce(flag, reduce_op="sum").item() > 0
    return stopping


def _exit_on_signal(fabric, stop, what: str, hint: bool = True) -> None:
    sig = stop.signal or signal.SIGTERM
    logger_flush(fabric)  # the CSV logger buffers rows in memory: write them before exiting
    fabric.print(f"\n{signal.Signals(sig).name} received: {what}."
                 + (" Resume with the same command plus resume=auto." if hint else ""))
    sys.exit(130 if sig == signal.SIGINT else 143)


def _print_if(fabric, line: Optional[str]) -> None:
    if line:
        fabric.print(line)


# --------------------------------------------------------------------------- the loop


def fit(fabric, cfg: Config, objective: Objective, lossmod, optimizer, scheduler, stream, val_batches,
        state: RunState, saver: Saver, stop: "_StopRequest", watch: Optional[CompileWatch] = None):
    """Train from state.step to train.max_steps: one optimizer step per iteration, validation and
    checkpoints on their schedules, a clean save-and-exit on SIGINT/SIGTERM (`stop`), also during
    the final validation. Steps that compile (`watch`) count as compile time, not throughput."""
    t = cfg.train
    watch = watch or CompileWatch()
    out_dir = Path(cfg.out_dir)
    rank0 = fabric.global_rank == 0
    progress = TrainProgress(total=t.max_steps, start=state.step, enabled=rank0 and cfg.output.progress)
    window_tokens, window_start = 0, time.perf_counter()
    tok_s = 0.0

    saved_at = None
    with progress:
        while state.step < t.max_steps:
            step_start = time.perf_counter()
            if watch.compiled(step_start):  # a validation since the last step compiled: not throughput either
                window_tokens, window_start = 0, step_start
            micro_batches = stream.step_batches(state.step)
            # Normalise by the trained tokens of the whole step on all ranks, counted up front.
            local = sum(objective.trained_tokens(b) for b in micro_batches)
            total = int(fabric.all_reduce(torch.tensor(local, device=fabric.device), reduce_op="sum").item())
            if total == 0:
                raise FinetuneError(f"step {state.step + 1} has no trained tokens (all labels masked)")
            loss_sum = torch.zeros((), device=fabric.device)
            outputs = []
            for i, batch in enumerate(micro_batches):
                batch = {k: v.to(fabric.device) for k, v in batch.items()}
                last = i == len(micro_batches) - 1
                with fabric.no_backward_sync(lossmod, enabled=not last):
                    out = lossmod(*objective.inputs(batch))  # (loss summed over the micro-batch, ...)
                    # DDP averages gradients over ranks; scaling by world size makes that a sum.
                    fabric.backward(out[0] * fabric.world_size / total)
                loss_sum += out[0].detach()
                outputs.append(tuple(x.detach() for x in out))
            step_loss = fabric.all_reduce(loss_sum, reduce_op="sum").item() / total
            logged = _step_metrics(fabric, objective, outputs, total)
            if not math.isfinite(step_loss):
                last_good = checkpoint.latest_checkpoint(out_dir)
                raise FinetuneError(f"loss is {step_loss} at step {state.step + 1}; stopped without updating. "
                                    f"Last good checkpoint: {last_good or 'none'}")
            if t.max_grad_norm:
                fabric.clip_gradients(lossmod, optimizer, max_norm=t.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            state.step += 1
            state.losses.append((state.step, step_loss))

            now = time.perf_counter()
            throughput = {}
            if watch.compiled(now, state.step):  # its time is compile time: tokens/s restarts after it
                fabric.print(watch.step_line(state.step))
                window_tokens, window_start = 0, now
            else:
                window_tokens += total
                tok_s = window_tokens / (now - window_start) if now > window_start else 0.0
                throughput = {f"{objective.normaliser}_per_s": tok_s}
            metrics = {"train_loss": step_loss, **logged, "lr": lr, **throughput,
                       "epoch": stream.epoch_at(state.step), **watch.metrics()}
            if state.step % t.log_every == 0 or state.step == t.max_steps:
                fabric.log_dict(metrics, step=state.step)
            progress.update(state.step, loss=step_loss, lr=lr, tok_s=tok_s)

            if val_batches is not None and t.eval_every and state.step % t.eval_every == 0:
                _validate(fabric, objective, lossmod, val_batches, state, progress)
            if t.save_every and state.step % t.save_every == 0 and state.step < t.max_steps:
                flush_history(fabric)  # before the checkpoint: a resume from it finds every row up to it
                saver.save_step(state)
                saved_at = state.step
            if state.step < t.max_steps and _stopping(fabric, stop):
                path = checkpoint.step_dir(cfg.out_dir, state.step)
                if saved_at != state.step:
                    flush_history(fabric)
                    path = saver.save_step(state)
                _exit_on_signal(fabric, stop, f"saved {path} at step {state.step}")

    if val_batches is not None:
        _validate(fabric, objective, lossmod, val_batches, state, progress)
    if watch.compiled(time.perf_counter()):  # the final validation compiled (no_grad is another graph)
        fabric.log_dict(watch.metrics(), step=state.step)
    _print_if(fabric, watch.summary_line())
    if _stopping(fabric, stop):  # after the last step: keep it as a checkpoint; resume validates and saves final
        flush_history(fabric)
        path = saver.save_step(state)
        _exit_on_signal(fabric, stop, f"saved {path} at step {state.step} (the last; final/ not written yet)")
    logger_flush(fabric)


def _step_metrics(fabric, objective: Objective, outputs: list, total: int) -> dict[str, float]:
    """The objective's step metrics summed over ranks: a sum over the step's normaliser, or a
    (sum, count) pair over its count (skipped where no rank counted any)."""
    logged = {}
    for k, v in objective.step_metrics(outputs).items():
        v = fabric.all_reduce(v, reduce_op="sum")
        if v.dim() == 0:
            logged[k] = v.item() / total
        elif v[1] > 0:
            logged[k] = (v[0] / v[1]).item()
    return logged


def _val_batches(objective: Objective, units: list, micro: int, fabric, pad_id: int,
                 max_batches: int) -> Optional[list[dict]]:
    """The same validation micro-batches every time: units in order, split over ranks, collated once.

    The units are the first max_batches x micro whatever the device count, so val_loss does not
    depend on it. Every rank gets the same number of batches (a short rank gets the objective's
    blank ones, worth 0 loss and 0 tokens): DDP syncs buffers and FSDP gathers weights in a
    forward, so ranks must run equally many. None = no validation data at all.
    """
    units = units[:max_batches * micro]
    if not len(units):
        return None
    mine = list(units[fabric.global_rank::fabric.world_size])
    per_rank = -(-len(units) // fabric.world_size)
    chunks = [mine[i:i + micro] for i in range(0, len(mine), micro)]
    chunks += [[objective.blank(units[0])]] * (-(-per_rank // micro) - len(chunks))
    return [objective.collate(c, pad_id) for c in chunks]


@torch.no_grad()
def _validate(fabric, objective: Objective, lossmod, val_batches: list[dict], state: RunState, progress) -> float:
    lossmod.eval()
    total_loss = torch.zeros((), device=fabric.device)
    total_tokens = torch.zeros((), device=fabric.device, dtype=torch.long)
    for batch in val_batches:
        batch = {k: v.to(fabric.device) for k, v in batch.items()}
        out = lossmod(*objective.inputs(batch))  # (loss summed over the micro-batch, its normaliser, ...)
        total_loss += out[0]
        total_tokens += out[1]
    lossmod.train()
    total_loss = fabric.all_reduce(total_loss, reduce_op="sum")
    total_tokens = fabric.all_reduce(total_tokens, reduce_op="sum")
    val = (total_loss / total_tokens.clamp(min=1)).item()
    state.val_losses.append((state.step, val))
    fabric.log_dict({"val_loss": val}, step=state.step)
    progress.note(f"step {state.step}: val_loss {val:.4f}")
    return val


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves at the next step boundary and exits cleanly."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a notebook worker)
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
