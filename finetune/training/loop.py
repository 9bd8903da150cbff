"""Training: recipe -> adapter, on Lightning Fabric. setup -> main -> fit, readable top to bottom.

Invariants this file keeps (each has a test):
- loss = sum of token losses / trained tokens over all micro-batches and ranks of a step, so
  4 x micro-batch 1 equals 1 x micro-batch 4 and 2 processes equal 1;
- the data order is a function of (seed, step) only, so resume needs just the step number and
  reproduces the uninterrupted run exactly on CPU;
- a checkpoint is complete or invisible (finetune.checkpoint), and Ctrl-C / SIGTERM / NaN never
  cost more than the steps since the last one."""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from finetune.config import Config, gradient_accumulation, to_yaml
from finetune.errors import FinetuneError, UsageError
from finetune.training import checkpoint
from finetune.training.distributed import (
    CheckpointState,
    fsdp_root,
    make_strategy,
    param_bytes,
)
from finetune.training.logs import logger_flush, make_loggers, plot_losses
from finetune.training.loss import CausalLMLoss

# --------------------------------------------------------------------------- setup


def resolve_precision(cfg: Config) -> tuple[str, str]:
    """(accelerator, precision): fp32 on CPU (bf16 there is pathologically slow), bf16 on GPU."""
    accelerator = cfg.accelerator
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        raise UsageError(f"accelerator={cfg.accelerator} but no CUDA GPU is visible; use accelerator=cpu")
    precision = cfg.precision or ("32-true" if accelerator == "cpu" else "bf16-mixed")
    return accelerator, precision


def make_fabric(cfg: Config):
    import lightning as L

    accelerator, precision = resolve_precision(cfg)
    loggers = make_loggers(cfg, Path(cfg.out_dir))
    return L.Fabric(accelerator=accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
                    strategy=make_strategy(cfg, accelerator), precision=precision, loggers=loggers)


def make_optimizer(cfg: Config, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    t = cfg.train
    kwargs = dict(lr=t.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    cls = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "adamw_8bit": bnb.optim.AdamW8bit,
           "paged_adamw": bnb.optim.PagedAdamW}[t.optimizer]
    return cls(params, **kwargs)


def lr_lambda(cfg: Config):
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at max_steps."""
    t = cfg.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


# --------------------------------------------------------------------------- entry points


def train(cfg: Config) -> Path:
    """Python API of `finetune recipe=...`: train and return the final adapter directory."""
    _preflight(cfg)
    fabric = make_fabric(cfg)
    fabric.launch()
    return main(fabric, cfg).final_dir


def _preflight(cfg: Config) -> None:
    """Usage checks made before fabric.launch(), by every process that will become a rank.

    After launch, a mistake seen by rank 0 alone would leave the other ranks waiting in a
    collective until the store times out; before it, no rank has started and nothing is written.
    """
    if cfg.resume == "no":
        checkpoint.check_out_dir(Path(cfg.out_dir), "no", cfg.overwrite)
    elif cfg.resume != "auto" and not checkpoint.is_complete(cfg.resume):
        raise UsageError(f"resume={cfg.resume} is not a complete checkpoint directory")
    if cfg.train.micro_batch_size != "auto" and cfg.devices > 0:
        gradient_accumulation(cfg, cfg.devices * cfg.num_nodes, int(cfg.train.micro_batch_size))


@dataclass
class TrainResult:
    final_dir: Path
    model: Optional[nn.Module] = None  # the trained peft model, for tests and notebooks
    state: Optional["RunState"] = None


@dataclass
class RunState:
    step: int = 0
    losses: list = field(default_factory=list)  # (step, train loss) for the loss curve
    val_losses: list = field(default_factory=list)


def main(fabric, cfg: Config) -> TrainResult:
    from finetune.data import BatchStream, prepare
    from finetune.models.load import load_model, load_tokenizer

    out_dir = Path(cfg.out_dir)
    rank0 = fabric.global_rank == 0
    final_dir = out_dir / "final"

    # Rank 0 alone repairs out_dir and picks the checkpoint; the others must not look while it does.
    resume_from = fabric.broadcast(_resume_source(cfg, out_dir, rank0) if rank0 else None)
    if resume_from is not None and resume_from.name == "final":
        fabric.print(f"{final_dir} is already complete; nothing to resume. Use a new out_dir to train again.")
        return TrainResult(final_dir)
    if cfg.model.trust_remote_code:
        fabric.print("warning: model.trust_remote_code=true: running model code shipped with the checkpoint")

    fabric.seed_everything(cfg.train.seed, verbose=False)  # one less stderr line per rank
    if not rank0:  # progress bars from rank 0 only (transformers shows one while loading weights)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(cfg.model)
    with fabric.rank_zero_first():  # rank 0 fills the tokenized cache, the others read it
        data = prepare(cfg.data, tokenizer, seed=cfg.train.seed, progress=rank0 and cfg.output.progress)
    if rank0:
        fabric.print(str(data.stats))

    model = load_model(cfg, fabric.device, tokenizer=tokenizer)
    # from_pretrained leaves the base in eval mode; until the first validation switched it, LoRA
    # dropout was off and transformers skipped gradient checkpointing (it checkpoints only in training).
    model.train()
    micro = cfg.train.micro_batch_size
    if micro == "auto":
        from finetune.plan.predict import auto_micro_batch

        # The planner sizes for the device's memory; a CPU has no such budget, the planner caps it.
        budget = (torch.cuda.get_device_properties(fabric.device).total_memory
                  if fabric.device.type == "cuda" else 12 * 2**30)
        micro = auto_micro_batch(cfg, budget)
        fabric.print(f"train.micro_batch_size=auto -> {micro}")
    accum = gradient_accumulation(cfg, fabric.world_size, micro)
    stream = BatchStream(data.train, global_batch_size=cfg.train.global_batch_size, micro_batch_size=micro,
                         world_size=fabric.world_size, rank=fabric.global_rank, seed=cfg.train.seed,
                         group_by_length=not cfg.data.packing, pad_id=tokenizer.pad_token_id)
    val_batches = _val_batches(data.val, micro, fabric, tokenizer.pad_token_id, cfg.train.eval_batches)

    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)  # counted now: FSDP turns them into shards
    _apply_liger(cfg, model, fabric.device)
    if cfg.train.mlp_tile_size:
        from finetune.memory.tiled import count_tiled

        n_tiled = count_tiled(model)
        fabric.print(f"train.mlp_tile_size={cfg.train.mlp_tile_size}: {n_tiled} MLPs run "
                     f"{cfg.train.mlp_tile_size} tokens at a time" if n_tiled else
                     "train.mlp_tile_size: no dense decoder MLP found to tile; training untiled")
    lossmod = CausalLMLoss(model, chunk=_loss_chunk(cfg, model), offload=cfg.train.offload_activations,
                           router_aux_coef=cfg.train.router_aux_loss_coef)
    optimizer = make_optimizer(cfg, trainable)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    if resume_from is not None:  # whole tensors, before FSDP shards them
        checkpoint.load_adapter_weights(model, resume_from)
    ckpt_state = CheckpointState(lossmod, model, optimizer)  # names, while the model is not yet wrapped
    whole = param_bytes(model)
    lossmod, optimizer = fabric.setup(lossmod, optimizer)
    if fsdp_root(lossmod) is not None:
        fabric.print(f"FSDP: rank 0 holds {param_bytes(lossmod) / 2**20:,.2f} MiB of the model's "
                     f"{whole / 2**20:,.2f} MiB of parameters")

    state = RunState()
    if resume_from is not None:
        _restore(resume_from, ckpt_state, lossmod, optimizer, scheduler, state)
        fabric.print(f"resumed from {resume_from} at step {state.step}")

    fabric.print(f"training {n_trainable:,} parameters; {fabric.world_size} process(es), "
                 f"micro-batch {micro} x accumulation {accum} x {fabric.world_size} = global {cfg.train.global_batch_size}")
    saver = Saver(fabric, cfg, model, tokenizer, lossmod, optimizer, scheduler, ckpt_state)
    fit(fabric, cfg, lossmod, optimizer, scheduler, stream, val_batches, state, saver)
    fabric.print(_peak_memory_line(cfg, fabric.device, micro))

    saver.save(final_dir, state)
    if rank0:
        if cfg.output.plot:
            plot_losses(state, out_dir / "loss.png")
        fabric.print(f"saved adapter to {final_dir}")
    if cfg.eval.suite and rank0:
        from finetune.eval.run import run_suite_after_training

        run_suite_after_training(cfg.eval.suite, final_dir, out_dir / "eval", cfg=cfg)
    return TrainResult(final_dir, model, state)


def _peak_memory_line(cfg: Config, device: torch.device, micro: int) -> str:
    """What this run's peak memory was, next to the planner's prediction on a GPU (the check on
    `finetune plan`, on the user's own card). A CPU has no allocator peak: report resident memory."""
    if device.type != "cuda":
        import resource

        return f"peak resident memory (this process): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    from finetune.plan.predict import CUDA_CONTEXT_BYTES, predict

    reserved = torch.cuda.max_memory_reserved(device) + CUDA_CONTEXT_BYTES
    line = (f"peak GPU memory (device {device.index}): {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB "
            f"allocated, ~{reserved / 2**30:.2f} GiB with reserve and CUDA context")
    try:
        planned = predict(cfg, micro_batch=micro).peak_bytes
    except UsageError:  # a model the planner cannot size: the measurement stands alone
        return line
    return line + f"; `finetune plan` predicted {planned / 2**30:.2f} GiB"


def _resume_source(cfg: Config, out_dir: Path, rank0: bool) -> Optional[Path]:
    if cfg.resume == "no":
        checkpoint.check_out_dir(out_dir, cfg.resume, cfg.overwrite) if rank0 else None
        return None
    if cfg.resume == "auto":
        if rank0 and out_dir.is_dir():
            checkpoint.recover(out_dir)  # finish or undo a save that a kill interrupted
        final = out_dir / "final"
        if checkpoint.is_complete(final):
            return final
        return checkpoint.latest_checkpoint(out_dir)
    path = Path(cfg.resume)
    if not checkpoint.is_complete(path):
        raise UsageError(f"resume={cfg.resume} is not a complete checkpoint directory")
    return path


def _apply_liger(cfg: Config, model: nn.Module, device: torch.device) -> None:
    """Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) patched into the base model, GPU only."""
    if not cfg.train.liger:
        return
    if device.type != "cuda":
        raise UsageError("train.liger=true needs a CUDA GPU (Liger kernels are Triton); set train.liger=false")
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        raise UsageError("train.liger=true but liger-kernel is not installed: pip install liger-kernel") from None
    # The cross-entropy kernels stay off: the chunked loss above already avoids full logits.
    _apply_liger_kernel_to_instance(model=model.get_base_model(), cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    if cfg.train.mlp_tile_size:  # Liger replaced the MLP forwards load_model had tiled: tile Liger's
        from finetune.memory.tiled import tile_mlps

        tile_mlps(model, cfg.train.mlp_tile_size)


def _loss_chunk(cfg: Config, model: nn.Module) -> int:
    # The chunked head runs outside the model's own forward; a trained lm_head would then miss
    # DDP's gradient sync, so it falls back to the plain loss.
    head_trained = any(p.requires_grad for p in model.get_output_embeddings().parameters())
    return 0 if head_trained else cfg.train.loss_chunk_size


@dataclass
class Saver:
    """Writes a checkpoint of the run. Every rank calls `save`: under FSDP the adapter and optimizer
    state are gathered collectively to rank 0, which writes; the others wait until it is complete."""

    fabric: object
    cfg: Config
    model: nn.Module  # the PeftModel (its config and save_pretrained)
    tokenizer: object
    lossmod: nn.Module  # what Fabric wrapped (FSDP's shards live here)
    optimizer: object
    scheduler: object
    ckpt_state: CheckpointState

    def save(self, path: Path, state: "RunState") -> None:
        adapter = self.ckpt_state.adapter_weights(self.lossmod)
        optim = self.ckpt_state.optimizer_state(self.lossmod, self.optimizer)
        if self.fabric.global_rank == 0:
            checkpoint.save_checkpoint(
                path, model=self.model, tokenizer=self.tokenizer, config_yaml=to_yaml(self.cfg),
                adapter_weights=adapter,
                state={"optimizer": optim, "scheduler": self.scheduler.state_dict(), "step": state.step,
                       "losses": state.losses, "val_losses": state.val_losses, "rng": checkpoint.capture_rng()})
        self.fabric.barrier()


def _restore(path: Path, ckpt_state: CheckpointState, lossmod, optimizer, scheduler, state: RunState) -> None:
    """Optimizer, schedule, step and RNG (the adapter weights were loaded before setup)."""
    saved = checkpoint.load_state(path)
    ckpt_state.load_optimizer_state(lossmod, optimizer, saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    state.step = int(saved["step"])
    state.losses = [tuple(x) for x in saved.get("losses", [])]
    state.val_losses = [tuple(x) for x in saved.get("val_losses", [])]
    checkpoint.restore_rng(saved["rng"])


# --------------------------------------------------------------------------- the loop


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


def fit(fabric, cfg: Config, lossmod, optimizer, scheduler, stream, val_batches, state: RunState, saver: Saver):
    from finetune.training.progress import TrainProgress

    t = cfg.train
    out_dir = Path(cfg.out_dir)
    rank0 = fabric.global_rank == 0
    progress = TrainProgress(total=t.max_steps, start=state.step, enabled=rank0 and cfg.output.progress)
    window_tokens, window_start = 0, time.perf_counter()

    with _StopRequest() as stop, progress:
        while state.step < t.max_steps:
            micro_batches = stream.step_batches(state.step)
            # Normalise by the trained tokens of the whole step on all ranks, counted up front.
            local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
            total = int(fabric.all_reduce(torch.tensor(local, device=fabric.device), reduce_op="sum").item())
            if total == 0:
                raise FinetuneError(f"step {state.step + 1} has no trained tokens (all labels masked)")
            loss_sum = torch.zeros((), device=fabric.device)
            for i, batch in enumerate(micro_batches):
                batch = {k: v.to(fabric.device) for k, v in batch.items()}
                last = i == len(micro_batches) - 1
                with fabric.no_backward_sync(lossmod, enabled=not last):
                    loss, _ = lossmod(batch["input_ids"], batch["labels"], batch["position_ids"])
                    # DDP averages gradients over ranks; scaling by world size makes that a sum.
                    fabric.backward(loss * fabric.world_size / total)
                loss_sum += loss.detach()
            step_loss = fabric.all_reduce(loss_sum, reduce_op="sum").item() / total
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

            window_tokens += total
            elapsed = time.perf_counter() - window_start
            tok_s = window_tokens / elapsed if elapsed > 0 else 0.0
            metrics = {"train_loss": step_loss, "lr": lr, "trained_tokens_per_s": tok_s,
                       "epoch": stream.epoch_at(state.step)}
            if state.step % t.log_every == 0 or state.step == t.max_steps:
                fabric.log_dict(metrics, step=state.step)
            progress.update(state.step, loss=step_loss, lr=lr, tok_s=tok_s)

            if val_batches is not None and t.eval_every and state.step % t.eval_every == 0:
                _validate(fabric, lossmod, val_batches, state, progress)
            if t.save_every and state.step % t.save_every == 0 and state.step < t.max_steps:
                _save_step(saver, state)
            stopping = stop.signal is not None
            if fabric.world_size > 1:  # ranks may get the signal a step apart; all must stop at the same one
                flag = torch.tensor(int(stopping), device=fabric.device)
                stopping = fabric.all_reduce(flag, reduce_op="sum").item() > 0
            if stopping and state.step < t.max_steps:
                path = _save_step(saver, state)
                sig = stop.signal or signal.SIGTERM
                logger_flush(fabric)  # the CSV logger buffers rows in memory: write them before exiting
                fabric.print(f"\n{signal.Signals(sig).name} received: saved {path} at step {state.step}. "
                             f"Resume with the same command plus resume=auto.")
                sys.exit(130 if sig == signal.SIGINT else 143)

    if val_batches is not None:
        _validate(fabric, lossmod, val_batches, state, progress)
    logger_flush(fabric)


def _save_step(saver: Saver, state: RunState) -> Path:
    out_dir = Path(saver.cfg.out_dir)
    path = checkpoint.step_dir(out_dir, state.step)
    saver.save(path, state)
    if saver.fabric.global_rank == 0 and saver.cfg.train.keep_last:
        checkpoint.prune(out_dir, saver.cfg.train.keep_last)
    return path


def _val_batches(units: list, micro: int, fabric, pad_id: int, max_batches: int) -> Optional[list[dict]]:
    """The same validation micro-batches every time: units in order, split over ranks, collated once.

    The units are the first max_batches x micro whatever the device count, so val_loss does not
    depend on it. Every rank gets the same number of batches (a short rank gets fully masked
    ones, worth 0 loss and 0 tokens): DDP syncs buffers and FSDP gathers weights in a forward,
    so ranks must run equally many. None = no validation data at all.
    """
    from finetune.data import collate

    units = units[:max_batches * micro]
    if not len(units):
        return None
    mine = list(units[fabric.global_rank::fabric.world_size])
    per_rank = -(-len(units) // fabric.world_size)
    chunks = [mine[i:i + micro] for i in range(0, len(mine), micro)]
    blank = {**units[0], "labels": [-100] * len(units[0]["input_ids"])}
    chunks += [[blank]] * (-(-per_rank // micro) - len(chunks))
    return [collate(c, pad_id) for c in chunks]


@torch.no_grad()
def _validate(fabric, lossmod, val_batches: list[dict], state: RunState, progress) -> float:
    lossmod.eval()
    total_loss = torch.zeros((), device=fabric.device)
    total_tokens = torch.zeros((), device=fabric.device, dtype=torch.long)
    for batch in val_batches:
        batch = {k: v.to(fabric.device) for k, v in batch.items()}
        loss, n = lossmod(batch["input_ids"], batch["labels"], batch["position_ids"])
        total_loss += loss
        total_tokens += n
    lossmod.train()
    total_loss = fabric.all_reduce(total_loss, reduce_op="sum")
    total_tokens = fabric.all_reduce(total_tokens, reduce_op="sum")
    val = (total_loss / total_tokens.clamp(min=1)).item()
    state.val_losses.append((state.step, val))
    fabric.log_dict({"val_loss": val}, step=state.step)
    progress.note(f"step {state.step}: val_loss {val:.4f}")
    return val
