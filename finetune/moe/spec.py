"""A MoE config (mergekit-moe's YAML keys) parsed into a checked `MoESpec`, before any weight loads."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from finetune.errors import UsageError, did_you_mean
from finetune.ranges import Range, check_value
from finetune.resources import read_yaml_mapping

SUPPORTED_BASES = ("llama", "mistral")
GATE_MODES = ["hidden", "cheap_embed", "random", "uniform_random"]  # finetune.moe.gates computes them
PROMPT_FORMATS = ["raw", "chat"]
DTYPES = ["auto", "bf16", "fp16", "fp32", "bfloat16", "float16", "float32"]


@dataclass
class ExpertSpec:
    source_model: Optional[str] = None
    adapter: Optional[str] = None
    positive_prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    noise_scale: Optional[float] = None
    residual_scale: Optional[float] = None

    @property
    def name(self) -> str:
        return str(self.adapter or self.source_model)


@dataclass
class MoESpec:
    base_model: str
    experts: list[ExpertSpec]
    gate_mode: str = "hidden"
    dtype: Optional[str] = None
    experts_per_token: int = 2
    prompt_format: str = "raw"
    quantize_prompting: bool = False
    seed: int = 0


# --------------------------------------------------------------------------- config


def _str_list(v, where: str) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise UsageError(f"{where} must be a list of strings")
    return list(v)


def _number(d: dict, key: str, where: str, rng: Optional[Range] = None) -> Optional[float]:
    """d[key] as a finite float in `rng` (None when absent): YAML gives strings and booleans too."""
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UsageError(f"{where}.{key} must be a number, got {v!r}")
    check_value(f"{where}.{key}", float(v), rng)
    return float(v)


def _integer(d: dict, key: str, where: str, rng: Range) -> int:
    v = d.get(key, 0)
    if isinstance(v, bool) or not isinstance(v, int):
        raise UsageError(f"{where}: {key} must be an integer, got {v!r}")
    check_value(f"{where}: {key}", v, rng)
    return v


def _flag(d: dict, key: str, where: str) -> bool:
    v = d.get(key, False)
    if not isinstance(v, bool):
        raise UsageError(f"{where}: {key} must be true or false, got {v!r}")
    return v


def parse_moe_config(data: dict, where: str = "moe config") -> MoESpec:
    """Validate a mergekit-moe style mapping into a MoESpec (one-line UsageErrors)."""
    top = ["base_model", "experts", "gate_mode", "dtype", "experts_per_token", "prompt_format",
           "quantize_prompting", "seed", "architecture", "shared_experts"]
    for k in data:
        if k not in top:
            raise UsageError(f"{where}: unknown key '{k}'{did_you_mean(k, top)}")
    if data.get("shared_experts"):
        raise UsageError(f"{where}: shared_experts are not supported by the Mixtral output")
    if str(data.get("architecture") or "mixtral").lower() != "mixtral":
        raise UsageError(f"{where}: architecture must be mixtral, got {data['architecture']}")
    if not data.get("base_model"):
        raise UsageError(f"{where}: base_model is required")
    if not isinstance(data["base_model"], str):
        raise UsageError(f"{where}: base_model must be a path or hub id, got {data['base_model']!r}")
    if data.get("dtype") is not None and str(data["dtype"]) not in DTYPES:
        raise UsageError(f"{where}: dtype must be one of {', '.join(DTYPES)}, got {data['dtype']!r}")
    mode = str(data.get("gate_mode", "hidden"))
    if mode not in GATE_MODES:
        raise UsageError(f"{where}: unknown gate_mode '{mode}'{did_you_mean(mode, GATE_MODES)}")
    fmt = str(data.get("prompt_format", "raw"))
    if fmt not in PROMPT_FORMATS:
        raise UsageError(f"{where}: unknown prompt_format '{fmt}'{did_you_mean(fmt, PROMPT_FORMATS)}")
    raw_experts = data.get("experts") or []
    if not isinstance(raw_experts, list) or len(raw_experts) < 2:
        n = len(raw_experts) if isinstance(raw_experts, list) else 0
        raise UsageError(f"{where}: a MoE needs at least 2 experts, got {n}")
    keys = ["source_model", "adapter", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"]
    experts = []
    for i, e in enumerate(raw_experts):
        if not isinstance(e, dict):
            raise UsageError(f"{where}: experts[{i}] must be a mapping with source_model or adapter")
        for k in e:
            if k not in keys:
                raise UsageError(f"{where}: experts[{i}]: unknown key '{k}'{did_you_mean(k, keys)}")
        if bool(e.get("source_model")) == bool(e.get("adapter")):
            raise UsageError(f"{where}: experts[{i}] needs exactly one of source_model or adapter")
        for k in ("source_model", "adapter"):
            if e.get(k) is not None and not isinstance(e[k], str):
                raise UsageError(f"{where}: experts[{i}].{k} must be a path or hub id, got {e[k]!r}")
        spec = ExpertSpec(source_model=e.get("source_model"), adapter=e.get("adapter"),
                          positive_prompts=_str_list(e.get("positive_prompts"), f"experts[{i}].positive_prompts"),
                          negative_prompts=_str_list(e.get("negative_prompts"), f"experts[{i}].negative_prompts"),
                          noise_scale=_number(e, "noise_scale", f"{where}: experts[{i}]", Range(ge=0)),
                          residual_scale=_number(e, "residual_scale", f"{where}: experts[{i}]"))
        if mode in ("hidden", "cheap_embed") and not spec.positive_prompts:
            raise UsageError(f"{where}: experts[{i}] ({spec.name}) has no positive_prompts, "
                             f"which gate_mode {mode} needs (or use gate_mode random)")
        experts.append(spec)
    k = data.get("experts_per_token", 2)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(experts):
        raise UsageError(f"{where}: experts_per_token must be an integer in [1, {len(experts)}], got {k!r}")
    return MoESpec(base_model=str(data["base_model"]), experts=experts, gate_mode=mode, dtype=data.get("dtype"),
                   experts_per_token=k, prompt_format=fmt, quantize_prompting=_flag(data, "quantize_prompting", where),
                   seed=_integer(data, "seed", where, Range(ge=0, le=2**32 - 1)))


def load_moe_config(path: str) -> MoESpec:
    """Read and check a MoE YAML; relative paths in it resolve against the YAML's folder."""
    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise UsageError(f"moe config not found: {path}")
    spec = parse_moe_config(read_yaml_mapping(p, "moe config"), where=str(p))
    # Relative paths in the YAML are relative to the YAML, so a config travels with its experts.
    def rel(x):
        return str((p.parent / x).resolve()) if x and not os.path.isabs(x) and (p.parent / x).exists() else x
    spec.base_model = rel(spec.base_model)
    for e in spec.experts:
        e.source_model, e.adapter = rel(e.source_model), rel(e.adapter)
    return spec
