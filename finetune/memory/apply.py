"""The memory features of a training model, applied in one place and in one order.

They change what a training step keeps in memory, never what it computes (each has a parity
test), and training and `finetune plan ... measure=true` both get them from here, so the planner
is checked against the model training really runs:

1. glibc's mmap threshold (CPU only, `train.fixed_mmap_threshold`): process-wide, for the
   activations every later step mallocs (finetune.memory.malloc);
2. lean autograd (`train.lean_activations`): SwiGLU MLPs keep two tensors instead of three, sdpa
   attention on the CPU keeps k/v unrepeated and one mask (finetune.memory.lean);
3. Liger's Triton kernels (`train.liger`, auto = on on a CUDA GPU with liger-kernel installed:
   finetune.kernels.liger_on): RMSNorm, SwiGLU and RoPE of the base model. After lean: where both apply to an MLP, Liger's forward replaces the lean one;
4. sequence-tiled MLPs (`train.mlp_tile_size`, finetune.memory.tiled): last, because each tile
   runs whatever forward the MLP has by then (the class's, lean's or Liger's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

from finetune.config import TrainConfig
from finetune.errors import UsageError
from finetune.memory.lean import patch_attention, patch_swiglu
from finetune.memory.malloc import fix_mmap_threshold
from finetune.memory.tiled import tile_mlps
from finetune.kernels import liger_on


@dataclass
class MemoryFeatures:
    """What `apply_memory_features` changed (for the run's log lines and for tests)."""

    mmap_threshold: bool = False  # glibc's threshold is fixed for this process
    lean_mlps: int = 0  # MLPs on the lean SwiGLU forward (before Liger replaced any)
    lean_attention: bool = False
    liger: bool = False
    tiled_mlps: int = 0


def apply_memory_features(model: nn.Module, train: TrainConfig, device: Union[str, torch.device]) -> MemoryFeatures:
    """Apply the memory features `train` asks for to `model` (a peft model) on `device`, in the
    order of this module's docstring. Settings a device cannot run are one-line UsageErrors."""
    device = torch.device(device)
    done = MemoryFeatures()
    if device.type == "cpu" and train.fixed_mmap_threshold:
        done.mmap_threshold = fix_mmap_threshold()
    if train.lean_activations:
        done.lean_mlps = patch_swiglu(model)
        done.lean_attention = patch_attention(model)
    if liger_on(train.liger, device.type == "cuda"):
        _apply_liger(model, device)
        done.liger = True
    if train.mlp_tile_size:
        done.tiled_mlps = tile_mlps(model, train.mlp_tile_size)
    return done


def _apply_liger(model: nn.Module, device: torch.device) -> None:
    """Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) patched into the base model, GPU only."""
    if device.type != "cuda":
        raise UsageError("train.liger=true needs a CUDA GPU (Liger kernels are Triton); use train.liger=auto (off on the CPU)")
    try:  # an optional dependency, imported only when asked for
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        raise UsageError("train.liger=true but liger-kernel is not installed: pip install liger-kernel") from None
    # Liger's cross-entropy kernels stay off. Its fused linear cross-entropy would fit our loss
    # (reduction="sum" over the trained rows, which finetune.training.loss then divides by the
    # trained tokens of the whole optimizer step, all micro-batches and ranks: the parity test in
    # tests/memory/test_apply.py checks that, on CUDA with liger-kernel), but it is the same
    # algorithm as finetune.memory.lean.linear_cross_entropy, which the chunked loss already runs
    # for a frozen head: the gradient wrt the hidden states formed in forward, chunk by chunk, and
    # only that kept. So no memory to gain; a kernel-speed gain is possible but unmeasured on a GPU.
    _apply_liger_kernel_to_instance(model=model.get_base_model(), cross_entropy=False,
                                    fused_linear_cross_entropy=False)
