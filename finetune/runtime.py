"""Device and dtype policy, in one place: which device a run uses and which dtypes live there.

fp32 on CPU (bf16 there depends on the CPU: measure before changing it), bf16 on GPU (fp16 where
the GPU has no bf16). Training, planning's `measure=true`, eval and merge all ask here.
"""

from __future__ import annotations

import re
from typing import Union

import torch

from finetune.config import Config
from finetune.errors import UsageError, did_you_mean

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device(accelerator: str = "auto") -> torch.device:
    """The torch device for a config's `accelerator` (auto: the current CUDA GPU if any, else CPU)."""
    acc = (accelerator or "auto").lower()
    if acc == "cpu":
        return torch.device("cpu")
    if acc in ("cuda", "gpu", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if acc == "auto":
            return torch.device("cpu")
        raise UsageError(f"accelerator={accelerator} but no CUDA GPU is visible; use accelerator=cpu")
    if acc == "mps":
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        raise UsageError("accelerator=mps but MPS is not available")
    raise UsageError(f"unknown accelerator '{accelerator}' (expected auto, cpu, cuda)")


def _gpu_half() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16


def base_dtype(cfg: Config, device: Union[str, torch.device]) -> torch.dtype:
    """Dtype of the frozen base weights: fp32 on CPU (bf16 there is pathologically slow) unless the
    precision is an explicit '*-true' half type; on GPU bf16 (fp16 without bf16 support, fp32 for '32')."""
    device = torch.device(device)
    prec = (cfg.precision or "").lower()
    half = torch.float16 if prec.startswith("16") else torch.bfloat16 if prec.startswith("bf16") else None
    if device.type == "cpu":
        return half if half is not None and prec.endswith("-true") else torch.float32
    if prec.startswith("32") or prec.startswith("64"):
        return torch.float32
    if half is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"precision={cfg.precision} but this GPU has no bf16; use precision=16-mixed")
    return half or _gpu_half()


def compute_dtype(cfg: Config, device: Union[str, torch.device]) -> torch.dtype:
    """Dtype the quantized layers compute in: quant.compute_dtype, auto = fp32 on CPU, bf16 on GPU."""
    device = torch.device(device)
    if cfg.quant.compute_dtype != "auto":
        return _DTYPES[cfg.quant.compute_dtype]
    return torch.float32 if device.type == "cpu" else base_dtype(cfg, device)


def storage_dtype(cfg: Config, device: Union[str, torch.device]) -> torch.dtype:
    """Packed 4-bit storage dtype: auto = the compute dtype under FSDP (so it shards), else uint8."""
    if cfg.quant.storage_dtype == "auto":
        return compute_dtype(cfg, device) if cfg.strategy == "fsdp" else torch.uint8
    return {"uint8": torch.uint8, **_DTYPES}[cfg.quant.storage_dtype]


def fsdp_param_dtype(cfg: Config, device: Union[str, torch.device]) -> torch.dtype:
    """The one dtype every parameter has under FSDP, which flattens each unit's parameters into a
    single tensor: the 4-bit storage dtype for QLoRA (= the compute dtype, so FSDP's mixed
    precision never casts the packed bytes), the base dtype for LoRA."""
    return storage_dtype(cfg, device) if cfg.quant.mode == "nf4" else base_dtype(cfg, device)


def resolve_precision(cfg: Config) -> tuple[str, str]:
    """(accelerator, precision) for Lightning Fabric: the accelerator `auto` resolves to, and the
    recipe's precision or the default for it: 32-true on CPU (bf16 there is pathologically slow),
    bf16-mixed on GPU."""
    accelerator = cfg.accelerator
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        raise UsageError(f"accelerator={cfg.accelerator} but no CUDA GPU is visible; use accelerator=cpu")
    precision = cfg.precision or ("32-true" if accelerator == "cpu" else "bf16-mixed")
    return accelerator, precision


# --------------------------------------------------------------------------- eval, merge and moe

# Names a saved checkpoint's dtype may be given by (merge dtype=, a MoE config's dtype:).
CHECKPOINT_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
                     "fp32": "float32", "float32": "float32"}


def inference_device(device: str = "auto") -> str:
    """`device=` of eval and the MoE tools: auto = cuda when visible, else cpu; cuda[:N] must exist."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|mps|cuda(:[0-9]+)?", device):
        raise UsageError(f"device must be auto, cpu, cuda, cuda:N or mps, got '{device}'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device={device} but no CUDA device is available; use device=cpu")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise UsageError(f"device={device} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device=mps but MPS is not available here; use device=cpu")
    return device


def inference_dtype(device: str, dtype: str = "auto") -> torch.dtype:
    """`dtype=` of eval: auto = fp32 on CPU (bf16 matmuls there are very slow), bf16 on GPU
    (fp16 where the GPU has no bf16)."""
    if dtype == "auto":
        return _gpu_half() if device.startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise UsageError(f"dtype must be auto, float32, bfloat16 or float16, got '{dtype}'")
    return _DTYPES[dtype]


def checkpoint_dtype(name: str, base_config=None) -> torch.dtype:
    """Dtype a merged model or MoE is saved in: auto = the base's recorded dtype (fp32 if none)."""
    if name == "auto":
        d = getattr(base_config, "dtype", None) or getattr(base_config, "torch_dtype", None) or "float32"
        return d if isinstance(d, torch.dtype) else getattr(torch, str(d).replace("torch.", ""))
    if name not in CHECKPOINT_DTYPES:
        raise UsageError(f"unknown dtype '{name}'{did_you_mean(name, ['auto', 'bf16', 'fp16', 'fp32'])}")
    return getattr(torch, CHECKPOINT_DTYPES[name])
