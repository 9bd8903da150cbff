"""Which kernels a training run uses on its device: Liger's, and the attention implementation.

Decided here, once, and readable without torch: finetune.runtime names the attention a training
model loads with (finetune.models.load), finetune.memory.apply applies Liger, and `finetune plan`,
which never imports torch, counts the same choices (finetune.plan.predict). `on_gpu` means a CUDA
GPU; the planner takes any accelerator but `cpu` for one, as it does for precision.

What auto picks, and why:

- Liger (`train.liger=auto`): on on a CUDA GPU where liger-kernel is installed, off on the CPU
  (its kernels are Triton, GPU only). Its fused RMSNorm keeps one fp32 rstd row per token instead
  of the norm's fp32 input, and its SwiGLU recomputes silu like finetune.memory.lean's.
- Attention (`model.attn_implementation=auto`): on a CUDA GPU flash_attention_2 where flash-attn
  is installed. Packed rows then take no mask at all: transformers sees position ids restarting
  and calls flash-attn's varlen kernel with each document's boundaries (cu_seqlens), where sdpa
  gets a dense micro_batch x 1 x seq x seq boolean mask per forward and a float copy of it per
  layer. Without flash-attn: sdpa. flex_attention would avoid the dense mask too, but transformers
  compiles it with dynamic=False, so every new padded batch length recompiles it (packed batches
  vary in length) until dynamo's recompile limit sends it to the eager fallback; and none of it is
  measured on a GPU yet. It stays an explicit choice. On the CPU: sdpa, which
  finetune.memory.lean replaces by its lean variant (k/v unrepeated, one float mask per forward),
  the best measured there; flex_attention has no backward on the CPU (torch 2.13).
"""

from __future__ import annotations

import importlib.util
from typing import Union

LIGER_MODULE = "liger_kernel"
FLASH_MODULE = "flash_attn"


def installed(module: str) -> bool:
    """Whether `module` can be imported here (found, not imported: no torch, no CUDA init)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def liger_on(setting: Union[bool, str, None], on_gpu: bool) -> bool:
    """train.liger as a decision: auto = on a CUDA GPU with liger-kernel installed; true and false
    as given (true on the CPU or without liger-kernel is refused where Liger is applied,
    finetune.memory.apply)."""
    if setting in (None, "auto"):
        return on_gpu and installed(LIGER_MODULE)
    return bool(setting)


def attention(setting: Union[str, None], on_gpu: bool) -> str:
    """model.attn_implementation as the name transformers gets: auto = flash_attention_2 on a CUDA
    GPU with flash-attn installed, else sdpa (this module's docstring says why); others as given."""
    if setting in (None, "auto"):
        return "flash_attention_2" if on_gpu and installed(FLASH_MODULE) else "sdpa"
    return setting


def varlen(attn: str) -> bool:
    """Whether packed rows run without any attention mask (flash-attn's varlen kernel)."""
    return attn == "flash_attention_2"
