"""What a run says about its memory: the micro-batch the planner picks for `auto`, what the memory
features did, how much of the model FSDP left on each rank, and the measured peak at the end.

Each is a line (or a number) for the loop to print; none changes what the run computes. The
planner (finetune.plan.predict) is the same arithmetic `finetune plan` prints, so the end-of-run
line on a GPU is the check of `finetune plan` on the user's own card.
"""

from __future__ import annotations

import resource
from typing import Optional

import torch
from torch import nn

from finetune.config import Config, TrainConfig
from finetune.errors import UsageError
from finetune.memory.apply import MemoryFeatures
from finetune.plan.fit import auto_micro_batch
from finetune.plan.predict import CUDA_CONTEXT_BYTES, predict
from finetune.training.distributed import fsdp_root, param_bytes

# A CPU has no device memory to fill: the planner sizes against this and caps the result anyway.
CPU_BUDGET_BYTES = 12 * 2**30


def micro_batch(cfg: Config, device: torch.device) -> int:
    """train.micro_batch_size, or for `auto` the largest the planner fits in `device`'s memory."""
    if cfg.train.micro_batch_size != "auto":
        return int(cfg.train.micro_batch_size)
    return auto_micro_batch(cfg, auto_budget(device))


def auto_budget(device: torch.device) -> int:
    """Bytes `train.micro_batch_size=auto` sizes a step's peak against. GPU: what is free before
    the model loads (other processes, a capped fraction and this process's CUDA context are not
    ours to fill; the total would overshoot by all of them), plus what torch already holds here
    (cached blocks it can reuse) and the context the planner counts itself. Called once the model
    is loaded, so what the model holds counts as ours: the planner's parts include it."""
    if device.type != "cuda":
        return CPU_BUDGET_BYTES
    free, total = torch.cuda.mem_get_info(device)
    cap = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device) * total
    mine = torch.cuda.memory_reserved(device)
    return int(min(free + mine, cap)) + CUDA_CONTEXT_BYTES


def tiles_line(train: TrainConfig, memory: MemoryFeatures) -> Optional[str]:
    """What train.mlp_tile_size did (None when it is off)."""
    if not train.mlp_tile_size:
        return None
    if not memory.tiled_mlps:
        return "train.mlp_tile_size: no dense decoder MLP found to tile; training untiled"
    return (f"train.mlp_tile_size={train.mlp_tile_size}: {memory.tiled_mlps} MLPs run "
            f"{train.mlp_tile_size} tokens at a time")


def fsdp_line(wrapped: nn.Module, whole_bytes: int) -> Optional[str]:
    """The parameter bytes this rank holds under FSDP next to the whole model's (None without FSDP).
    `whole_bytes` is `param_bytes` of the model before Fabric wrapped it."""
    if fsdp_root(wrapped) is None:
        return None
    return (f"FSDP: rank 0 holds {param_bytes(wrapped) / 2**20:,.2f} MiB of the model's "
            f"{whole_bytes / 2**20:,.2f} MiB of parameters")


def peak_memory_line(cfg: Config, device: torch.device, micro: int) -> str:
    """What this run's peak memory was, next to the planner's prediction on a GPU. A CPU has no
    allocator peak: report resident memory."""
    if device.type != "cuda":
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # in KiB on Linux
        return f"peak resident memory (this process): {kib / 2**20:.2f} GiB"
    reserved = torch.cuda.max_memory_reserved(device) + CUDA_CONTEXT_BYTES
    line = (f"peak GPU memory (device {device.index}): {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB "
            f"allocated, ~{reserved / 2**30:.2f} GiB with reserve and CUDA context")
    try:
        planned = predict(cfg, micro_batch=micro).peak_bytes
    except UsageError:  # a model the planner cannot size: the measurement stands alone
        return line
    return line + f"; `finetune plan` predicted {planned / 2**30:.2f} GiB"
