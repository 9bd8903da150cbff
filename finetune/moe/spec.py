"""A MoE config (mergekit-moe's YAML keys) parsed into a checked `MoESpec`, before any weight loads.

Keys, choices, types and ranges are checked as a recipe's are (finetune.typed); what no single
key can say (an expert is a model or an adapter, prompts for the prompt-driven gates, top-k within
the expert count) is checked after.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from finetune.errors import UsageError
from finetune.ranges import ranged
from finetune.resources import read_yaml_mapping
from finetune.typed import items, parse_mapping

SUPPORTED_BASES = ("llama", "mistral")
PROMPTS = ("positive_prompts", "negative_prompts")


@dataclass
class ExpertSpec:
    """One item of `experts:`: a full fine-tune of the base or a LoRA adapter on it."""

    source_model: Optional[str] = None
    """A full fine-tune of the base: a directory (relative to the YAML) or a hub id."""
    adapter: Optional[str] = None
    """A LoRA adapter on the base (beyond mergekit), merged on the fly."""
    positive_prompts: list[str] = field(default_factory=list)
    """Prompts this expert should win (gate_mode hidden and cheap_embed need them); one string or a list."""
    negative_prompts: list[str] = field(default_factory=list)
    """Prompts this expert should lose; one string or a list."""
    noise_scale: Optional[float] = ranged(None, ge=0)
    """Gaussian noise added to this expert's MLP weights."""
    residual_scale: Optional[float] = None
    """Multiplies this expert's down_proj (its residual contribution)."""

    @property
    def name(self) -> str:
        return str(self.adapter or self.source_model)


@dataclass
class MoESpec:
    """A MoE config file, as finetune.moe.build shows."""

    base_model: str = ""
    """The base every expert was fine-tuned from: a directory (relative to the YAML) or a hub id."""
    experts: list[ExpertSpec] = items("experts[{i}]")
    """At least two experts."""
    gate_mode: Literal["hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random"] = "hidden"
    """How router weights are made from the prompts (finetune.moe.gates computes them); hidden_avg and
    hidden_last are mergekit's names for averaging the prompt's hidden states or taking the last one."""
    dtype: Optional[Literal["auto", "bf16", "fp16", "fp32", "bfloat16", "float16", "float32"]] = None
    """Output dtype (default: the base's)."""
    experts_per_token: int = 2
    """Experts each token is routed to (1 to the number of experts)."""
    prompt_format: Literal["raw", "chat"] = "raw"
    """raw prompts, or rendered with the base's chat template (finetune.moe.gates)."""
    quantize_prompting: bool = False
    """Run the base in bitsandbytes NF4 while computing hidden-mode gates (a 7B base fits 12 GB)."""
    seed: int = ranged(0, ge=0, le=2**32 - 1)
    """Seed of random gates and expert noise."""
    architecture: str = "mixtral"
    """Output architecture: mixtral (the only one)."""
    shared_experts: Optional[list[Any]] = None
    """mergekit's Qwen-MoE shared experts: not supported by the Mixtral output."""


# --------------------------------------------------------------------------- config


def parse_moe_config(data: dict, where: str = "moe config") -> MoESpec:
    """Validate a mergekit-moe style mapping into a MoESpec (one-line UsageErrors)."""
    if isinstance(data.get("experts"), list):  # a prompt list may be one string (mergekit's too)
        data = {**data, "experts": [{**e, **{k: [e[k]] for k in PROMPTS if isinstance(e.get(k), str)}}
                                    if isinstance(e, dict) else e for e in data["experts"]]}
    spec = parse_mapping(MoESpec, data, where)
    if spec.shared_experts:
        raise UsageError(f"{where}: shared_experts are not supported by the Mixtral output")
    if spec.architecture.lower() != "mixtral":
        raise UsageError(f"{where}: architecture must be mixtral, got {spec.architecture}")
    if not spec.base_model:
        raise UsageError(f"{where}: base_model is required")
    if len(spec.experts) < 2:
        raise UsageError(f"{where}: a MoE needs at least 2 experts, got {len(spec.experts)}")
    for i, e in enumerate(spec.experts):
        if bool(e.source_model) == bool(e.adapter):
            raise UsageError(f"{where}: experts[{i}] needs exactly one of source_model or adapter")
        if spec.gate_mode in ("hidden", "hidden_avg", "hidden_last", "cheap_embed") and not e.positive_prompts:
            raise UsageError(f"{where}: experts[{i}] ({e.name}) has no positive_prompts, "
                             f"which gate_mode {spec.gate_mode} needs (or use gate_mode random)")
    k = spec.experts_per_token
    if not 1 <= k <= len(spec.experts):
        raise UsageError(f"{where}: experts_per_token must be an integer in [1, {len(spec.experts)}], got {k!r}")
    return spec


def load_moe_config(path: str) -> MoESpec:
    """Read and check a MoE YAML; relative paths in it resolve against the YAML's folder."""
    p = Path(os.path.expanduser(path))
    if p.is_dir():
        raise UsageError(f"moe config {path} is a folder; give the MoE YAML file in it")
    if not p.is_file():
        raise UsageError(f"moe config not found: {path}")
    spec = parse_moe_config(read_yaml_mapping(p, "moe config"), where=f"moe config {p}")
    # Relative paths in the YAML are relative to the YAML, so a config travels with its experts.
    def rel(x):
        return str((p.parent / x).resolve()) if x and not os.path.isabs(x) and (p.parent / x).exists() else x
    spec.base_model = rel(spec.base_model)
    for e in spec.experts:
        e.source_model, e.adapter = rel(e.source_model), rel(e.adapter)
    return spec
