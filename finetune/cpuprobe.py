"""The CPU precision probe's override and cache, readable without torch.

finetune.runtime measures whether bf16 beats fp32 on this CPU and decides precision=auto's dtypes
from it (runtime.cpu_auto_dtype); `finetune plan`, which never imports torch, reads the same
decision here: the FINETUNE_CPU_PRECISION override, else what the probe cached for this CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Optional

from finetune.errors import UsageError
from finetune.fs import cache_root

# FINETUNE_CPU_PRECISION=fp32|bf16 overrides the CPU probe (tests pin fp32: their expected losses are fp32's).
CPU_PRECISION_ENV = "FINETUNE_CPU_PRECISION"


def forced_cpu_precision() -> Optional[str]:
    """'fp32' or 'bf16' where FINETUNE_CPU_PRECISION names one, None where it is unset."""
    forced = os.environ.get(CPU_PRECISION_ENV, "").strip().lower()
    if forced in ("fp32", "float32", "32"):
        return "fp32"
    if forced in ("bf16", "bfloat16"):
        return "bf16"
    if forced:
        raise UsageError(f"{CPU_PRECISION_ENV}={forced}: expected fp32 or bf16 (or unset: measure)")
    return None


def cpu_identity() -> str:
    """This CPU's model name and AVX512/AMX flags: the part of the probe's cache key torch has no say in."""
    info = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        info = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), info)
        flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
        info += " " + " ".join(sorted(f for f in flags if f.startswith(("avx512", "amx"))))
    except OSError:
        pass
    return info


def probe_key(torch_version: str, threads: int) -> str:
    return f"{cpu_identity()}|torch {torch_version}|threads {threads}"


def probe_dir() -> Path:
    return cache_root() / "cpu-precision"


def probe_path(key: str) -> Path:
    return probe_dir() / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")


def cached_bf16_faster() -> Optional[bool]:
    """What the probe cached for this CPU and the installed torch, read without importing torch:
    None where nothing is cached. The key's thread count is torch's own default (physical cores,
    unless OMP_NUM_THREADS says otherwise), so every cached thread count of this CPU and torch is
    read; where they disagree, None too."""
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None
    prefix = probe_key(version, 0).rsplit("|threads ", 1)[0] + "|threads "
    found = set()
    for path in sorted(probe_dir().glob("*.json")) if probe_dir().is_dir() else []:
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a torn or foreign file: runtime measures again
        if isinstance(d, dict) and str(d.get("cpu", "")).startswith(prefix) and "bf16_faster" in d:
            found.add(bool(d["bf16_faster"]))
    return found.pop() if len(found) == 1 else None


def planned_cpu_precision() -> Optional[str]:
    """The concrete precision precision=auto trains with on this CPU, torch-free: 'bf16-true' (bf16
    frozen weights, fp32 LoRA: runtime.planned_precision) or '32-true'; None where the probe has
    not run yet and nothing forces it."""
    forced = forced_cpu_precision()
    bf16 = (forced == "bf16") if forced else cached_bf16_faster()
    return None if bf16 is None else ("bf16-true" if bf16 else "32-true")
