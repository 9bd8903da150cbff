"""Device and dtype policy, in one place: which device a run uses and which dtypes live there.

GPU: frozen weights in bf16 (fp16 where the GPU has no bf16) under bf16 autocast. CPU: `precision=auto`
(the default) measures once per CPU whether a bf16 matmul beats fp32 there (cpu_probe, cached in
the cache root) and keeps the frozen weights in bf16 only where it does. Everywhere, fp32
only where it earns its bytes: the LoRA weights and their optimizer state (kbit_frozen_dtypes says
why not the norms), which compute in the half dtype next to half frozen weights (lora_compute_dtype). Training, planning's `measure=true`, eval, merge and the MoE tools all ask here.
"""

from __future__ import annotations

import json
import re
import time
from typing import Optional, Union

import torch

from finetune.config import Config
# the override and the probe's cache key live in finetune.cpuprobe, torch-free for the planner
from finetune.cpuprobe import CPU_PRECISION_ENV, forced_cpu_precision, probe_key, probe_path  # noqa: F401
from finetune.errors import UsageError, did_you_mean
from finetune.fs import atomic_write
from finetune.kernels import attention

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


# train.compile=auto, per device type: regional compile of the decoder layers where it is known to
# pay. CPU: off. Measured on an idle 2-core AVX512-BF16 EPYC (bench/results/cpu-vs-peers-compile.json,
# SmolLM2-135M, seq 512 x 4): 1.9% faster steps and 23% lower peak RSS, for ~22 s of compiling with a
# warm inductor cache (minutes cold) -- more than a run of a few hundred steps saves.
COMPILE_AUTO = {"cuda": True, "cpu": False}


def compile_layers(setting: str, device: Union[str, torch.device]) -> bool:
    """Whether `train.compile` (off | layers | auto) compiles the decoder layers on `device`."""
    if setting == "auto":
        return COMPILE_AUTO.get(torch.device(device).type, False)
    return setting == "layers"


def _gpu_half() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16


def cpu_auto_dtype() -> torch.dtype:
    """What `precision=auto` keeps the frozen weights in on this CPU: bf16 where a bf16 matmul
    measures clearly faster than fp32 (AVX512-BF16, AMX), else fp32 (bf16 without hardware support
    is emulated and several times slower). Measured once per CPU, torch version and thread count;
    FINETUNE_CPU_PRECISION=fp32|bf16 overrides it (finetune.cpuprobe)."""
    forced = forced_cpu_precision()
    if forced:
        return torch.bfloat16 if forced == "bf16" else torch.float32
    return torch.bfloat16 if cpu_probe()["bf16_faster"] else torch.float32


# The probe's shape: SmolLM2-135M's MLP at 2048 tokens (the CPU bench's largest matmuls).
PROBE_SHAPE = (2048, 576, 1536)
# bf16 must win by this factor: the rest of a step (norms, softmax, casts, the fp32 LoRA branch)
# gains less than the matmuls, so a marginal matmul win is no training win.
PROBE_MARGIN = 1.3


def _cpu_key() -> str:
    """This CPU's identity for the probe cache: model name, ISA flags, torch version, threads."""
    return probe_key(torch.__version__, torch.get_num_threads())


def _matmul_gflops(dtype: torch.dtype, reps: int = 5) -> float:
    m, k, n = PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)
    a @ b  # first call: oneDNN picks and caches its kernel
    best = float("inf")
    for _ in range(reps):  # best of reps: other processes only ever slow a run down
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best / 1e9


def cpu_probe(refresh: bool = False) -> dict:
    """fp32 and bf16 matmul GFLOP/s on this CPU at PROBE_SHAPE and whether bf16 wins by
    PROBE_MARGIN; measured once (~0.5 s) and cached in <cache root>/cpu-precision/<key>.json."""
    key = _cpu_key()
    path = probe_path(key)
    if path.is_file() and not refresh:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass  # a torn or foreign file: measure again
    fp32, bf16 = _matmul_gflops(torch.float32), _matmul_gflops(torch.bfloat16)
    out = {"cpu": key, "shape": list(PROBE_SHAPE), "fp32_gflops": round(fp32, 1), "bf16_gflops": round(bf16, 1),
           "bf16_faster": bf16 > PROBE_MARGIN * fp32, "margin": PROBE_MARGIN,
           "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(out, indent=1) + "\n")
    return out


def _auto(cfg: Config) -> bool:
    return cfg.precision in (None, "auto")


def base_dtype(cfg: Config, device: Union[str, torch.device]) -> torch.dtype:
    """Dtype of the frozen base weights. CPU: precision=auto -> cpu_auto_dtype(); an explicit
    '*-true' half type is the user's call; anything else fp32. GPU: bf16 (fp16 without bf16
    support, fp32 for '32')."""
    device = torch.device(device)
    prec = (cfg.precision or "auto").lower()
    half = torch.float16 if prec.startswith("16") else torch.bfloat16 if prec.startswith("bf16") else None
    if device.type == "cpu":
        if _auto(cfg):
            return cpu_auto_dtype()
        return half if half is not None and prec.endswith("-true") else torch.float32
    if prec.startswith("32") or prec.startswith("64"):
        return torch.float32
    if half is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"precision={cfg.precision} but this GPU has no bf16; use precision=16-mixed")
    return half or _gpu_half()


def compute_dtype(cfg: Config, device: Union[str, torch.device]) -> torch.dtype:
    """Dtype the quantized layers compute in: quant.compute_dtype, auto = the base weights' dtype."""
    if cfg.quant.compute_dtype != "auto":
        return _DTYPES[cfg.quant.compute_dtype]
    return base_dtype(cfg, device)


def kbit_frozen_dtypes(cfg: Config, device: Union[str, torch.device]) -> dict[str, Optional[torch.dtype]]:
    """Dtypes the frozen, unquantized weights of a k-bit model take after peft's
    prepare_model_for_kbit_training, which upcasts all of them (embeddings, head, norms) to fp32:
    {"embeddings": dtype, "norms": dtype}, None = leave peft's fp32 (a compute dtype of fp32).

    - Embeddings and head: the compute dtype. They are frozen, stored in half precision in the
      checkpoint, and fp32 doubles them (Llama-3.1-8B: +2 GiB) without adding a bit to them.
    - Norms, under bf16: the compute dtype too. Their bytes are nothing (2 x hidden per layer);
      their output dtype is everything: an fp32 weight promotes the norm's output to fp32, and
      bitsandbytes' Linear4bit returns its input's dtype, so under autocast the residual stream
      and every checkpointed layer input stay fp32 (twice the activations). RMSNorm computes its
      statistics in fp32 internally whatever the weight's dtype, so nothing is lost.
    - Norms, under fp16: fp32, as peft keeps them: fp16's range (65504) is why peft upcasts, and
      a norm's output times an fp16 weight can overflow it. The residual then runs in fp32
      (finetune.plan.predict counts it so).
    The trained tensors (LoRA weights, modules_to_save copies) stay fp32 with fp32 optimizer state:
    those are the bytes that earn their precision (small updates vanish in a bf16 weight)."""
    c = compute_dtype(cfg, device)
    if c == torch.float32:
        return {"embeddings": None, "norms": None}
    return {"embeddings": c, "norms": c if c == torch.bfloat16 else None}


def lora_compute_dtype(cfg: Config, device: Union[str, torch.device]) -> Optional[torch.dtype]:
    """Dtype the LoRA branches and modules_to_save copies compute in (lora.compute_dtype), None =
    peft's fp32 branch. Their weights and optimizer state stay fp32 whatever this says (small updates
    vanish in a bf16 weight); only the matmuls run in this dtype, on fp32 master weights cast per
    forward, as GPU autocast does (finetune.models.dtypes.trained_in_fp32 applies it).

    auto = the frozen weights' compute dtype where that is half precision: bf16 at precision=auto on
    a bf16 CPU (Fabric 32-true, no autocast) and on a GPU (bf16-mixed). peft would otherwise cast
    each branch's bf16 input up to an fp32 copy (kept for backward, one per branch) and run its
    matmuls in fp32; under GPU autocast the matmuls were bf16 already and only that copy goes.
    Measured on SmolLM2-135M at bf16 frozen weights, 6 steps: every loss within 0.36% of fp32's (README)."""
    name = cfg.lora.compute_dtype
    if name == "auto":
        c = compute_dtype(cfg, device) if cfg.quant.mode != "none" else base_dtype(cfg, device)
        return None if c == torch.float32 else c
    return None if name == "float32" else _DTYPES[name]


def storage_dtype(cfg: Config, device: Union[str, torch.device]) -> torch.dtype:
    """Packed 4-bit storage dtype: auto = the compute dtype under FSDP (so it shards), else uint8."""
    if cfg.quant.storage_dtype == "auto":
        return compute_dtype(cfg, device) if cfg.strategy == "fsdp" else torch.uint8
    return {"uint8": torch.uint8, **_DTYPES}[cfg.quant.storage_dtype]


def fsdp_param_dtype(cfg: Config, device: Union[str, torch.device]) -> torch.dtype:
    """The one dtype every parameter has under FSDP, which flattens each unit's parameters into a
    single tensor: the 4-bit storage dtype for QLoRA (= the compute dtype unless quant.storage_dtype
    names another), the base dtype for LoRA.

    It is also FSDP's whole mixed-precision policy, for every precision: parameters are gathered,
    computed with and reduced in this dtype, buffers keep theirs, and Fabric's precision plugin
    never casts the module (finetune.training.distributed.PolicyPrecision). Fabric's own policy
    follows the precision string instead (32-true: fp32; *-mixed: the half type), which cast the
    flat parameter holding the NF4 bytes as if they were numbers: at precision=auto on a bf16 CPU
    (storage bf16, Fabric 32-true) bitsandbytes then read twice the bytes ("shape '[64, 32]' is
    invalid for input of size 4096"); on a GPU it would have dequantized garbage."""
    return storage_dtype(cfg, device) if cfg.quant.mode == "nf4" else base_dtype(cfg, device)


def resolve_precision(cfg: Config) -> tuple[str, str]:
    """(accelerator, precision) for Lightning Fabric: the accelerator `auto` resolves to, and the
    recipe's precision, for `auto`: bf16-mixed on GPU (16-mixed without bf16); 32-true on CPU,
    where the frozen weights' dtype is base_dtype's (bf16 where this CPU measured it faster), so
    Fabric neither autocasts nor casts the module. An explicit bf16-true / 16-true is 32-true for
    Fabric too: base_dtype already makes the frozen weights that half type, and Fabric's own
    *-true would also cast the LoRA weights and their optimizer state, where small updates
    vanish. So bf16-true trains exactly as precision=auto on a bf16 CPU (what
    planned_precision says and finetune.plan.predict counts)."""
    accelerator = cfg.accelerator
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        raise UsageError(f"accelerator={cfg.accelerator} but no CUDA GPU is visible; use accelerator=cpu")
    if not _auto(cfg):
        return accelerator, "32-true" if cfg.precision in ("bf16-true", "16-true") else cfg.precision
    if accelerator == "cpu":
        return accelerator, "32-true"
    return accelerator, "bf16-mixed" if _gpu_half() == torch.bfloat16 else "16-mixed"


def planned_precision(cfg: Config, device: Union[str, torch.device]) -> str:
    """A concrete precision naming the dtypes `cfg` gets on `device`, for the torch-free planner
    (which reads the same choice for precision=auto on a CPU from the probe's cache:
    finetune.cpuprobe.planned_cpu_precision): on a CPU where
    precision=auto chose bf16 that is bf16-true (same frozen dtypes; the LoRA weights stay fp32)."""
    device = torch.device(device)
    if not _auto(cfg):
        return cfg.precision
    if device.type == "cpu":
        return "bf16-true" if base_dtype(cfg, device) == torch.bfloat16 else "32-true"
    return "bf16-mixed" if _gpu_half() == torch.bfloat16 else "16-mixed"


def attention_implementation(cfg: Config, device: Union[str, torch.device]) -> str:
    """The attention implementation a training model on `device` loads with:
    model.attn_implementation, auto = flash_attention_2 on a CUDA GPU with flash-attn installed,
    else sdpa (finetune.kernels.attention says why). flex_attention on the CPU is refused here,
    before the model loads: torch has no flex backward on the CPU."""
    on_gpu = torch.device(device).type == "cuda"
    attn = attention(cfg.model.attn_implementation, on_gpu)
    if attn == "flex_attention" and not on_gpu:
        raise UsageError("model.attn_implementation=flex_attention cannot train on the CPU (torch has no "
                         "flex_attention backward there); use model.attn_implementation=auto")
    return attn


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
    """`dtype=` of eval, and what NF4 layers compute in when a model only runs prompts: auto = fp32
    on CPU (bf16 matmuls there are very slow), bf16 on GPU (fp16 where the GPU has no bf16)."""
    if dtype == "auto":
        return _gpu_half() if device.startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise UsageError(f"dtype must be auto, float32, bfloat16 or float16, got '{dtype}'")
    return _DTYPES[dtype]


# Hidden-mode MoE gates run the base in fp32 up to this much decoder weight (in fp32 bytes).
FP32_PROMPTING_BYTES = 2 << 30


def prompting_dtype(base_config, stored: torch.dtype) -> torch.dtype:
    """Dtype of the base copy that computes hidden-mode MoE gates: fp32 while that copy is small,
    bigger bases in their `stored` dtype. The gates are a few prompts' hidden states, and an fp32
    copy of a 1B base (5 GB) would be the whole build's peak memory; in the stored bf16 it is half
    that. (Quantized, with quantize_prompting, its layers compute in inference_dtype.)"""
    c = base_config
    n = c.num_hidden_layers * 4 * c.hidden_size * (c.hidden_size + c.intermediate_size)
    return torch.float32 if n * 4 <= FP32_PROMPTING_BYTES else stored


def checkpoint_dtype(name: str, base_config=None) -> torch.dtype:
    """Dtype a merged model or MoE is saved in: auto = the base's recorded dtype (fp32 if none)."""
    if name == "auto":
        d = getattr(base_config, "dtype", None) or getattr(base_config, "torch_dtype", None) or "float32"
        return d if isinstance(d, torch.dtype) else getattr(torch, str(d).replace("torch.", ""))
    if name not in CHECKPOINT_DTYPES:
        raise UsageError(f"unknown dtype '{name}'{did_you_mean(name, ['auto', 'bf16', 'fp16', 'fp32'])}")
    return getattr(torch, CHECKPOINT_DTYPES[name])
