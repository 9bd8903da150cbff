"""Build a Mixtral-style MoE from fine-tunes of one base (mergekit-moe style):
`finetune moe config=moe.yaml out_dir=OUT` (the YAML is parsed by finetune.moe.spec).

The YAML uses mergekit-moe's keys, so existing configs work:

    base_model: path-or-hub-id
    gate_mode: hidden            # hidden | cheap_embed | random | uniform_random
    dtype: bfloat16              # output dtype (default: the base's)
    experts_per_token: 2
    experts:
      - source_model: path       # a full fine-tune of the base ...
        positive_prompts: [...]
        negative_prompts: [...]
        noise_scale: 0.0         # Gaussian noise added to this expert's MLP weights
        residual_scale: 1.0      # multiplies this expert's down_proj (its residual contribution)
      - adapter: path            # ... or (beyond mergekit) a LoRA adapter on the base, merged on the fly

plus `prompt_format: raw|chat` (see finetune.moe.gates), `quantize_prompting: true` (run the base
in bitsandbytes NF4 while computing hidden-mode gates, so a 7B base fits 12 GB) and `seed`.

What the output holds: embeddings, attention, norms and lm_head come from the base; expert e's MLP
in every layer comes from expert e (Llama gate_proj/up_proj/down_proj = Mixtral w1/w3/w2). In
memory transformers 5.x stacks the experts as `mlp.experts.gate_up_proj` (E, 2I, H: gate rows then
up rows) and `mlp.experts.down_proj` (E, H, I), with the router at `mlp.gate.weight` (E, H); we fill
those tensors on a real MixtralForCausalLM and let `save_pretrained` write them, which stores the
classic per-expert `block_sparse_moe.experts.N.w1/w2/w3` keys that every loader reads.

Adapter experts: only the adapter's MLP deltas survive. A delta on attention (q/k/v/o_proj), on the
embeddings/lm_head (modules_to_save) or on a norm has no per-expert place in a shared-attention MoE;
averaging them across experts would build an attention that none of the experts was trained with,
so, like mergekit (which takes attention from the base), they are dropped. The build logs one
warning per adapter listing the dropped modules and records them in `moe_info.json`.

Routing: Mixtral in transformers 5.3 softmaxes the router logits, takes the top-k and renormalises
the k weights to sum to 1. So a MoE whose experts all equal the base reproduces the base exactly.
Training the router afterwards is finetune.moe.routing's part.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch
from peft import PeftModel
from rich.progress import track
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GenerationConfig,
    MixtralConfig,
)

from finetune.errors import UsageError
from finetune.fs import atomic_out_dir, check_out_dir
from finetune.merge import copy_tokenizer, load_base_full_precision
from finetune.models.adapters import read_adapter_config
from finetune.models.load import resolve_model_path
from finetune.moe.gates import compute_gates, warn_parallel
from finetune.moe.spec import SUPPORTED_BASES, ExpertSpec, MoESpec
from finetune.portable import portable_config
from finetune.runtime import checkpoint_dtype, inference_device

log = logging.getLogger(__name__)
MLP_PARTS = ("gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------- checks


def _read_config(path: str, what: str):
    try:
        return AutoConfig.from_pretrained(path)
    except OSError as err:
        raise UsageError(f"{what}: {str(err).splitlines()[0]}") from None


def _check_sources(spec: MoESpec):
    """Resolve every path and refuse incompatible experts before any heavy loading."""
    base_path = resolve_model_path(spec.base_model)
    base_cfg = _read_config(base_path, f"base_model {spec.base_model}")
    if base_cfg.model_type not in SUPPORTED_BASES:
        raise UsageError(f"base_model {spec.base_model} is a {base_cfg.model_type} model; "
                         f"a Mixtral MoE needs a {' or '.join(SUPPORTED_BASES)} base")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(base_cfg, flag, False):
            raise UsageError(f"base_model {spec.base_model} has {flag}=true, which Mixtral cannot hold")
    shape_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
    sources = []
    for i, e in enumerate(spec.experts):
        if e.adapter:
            acfg = read_adapter_config(e.adapter)
            abase = resolve_model_path(acfg["base_model_name_or_path"])
            if os.path.realpath(abase) != os.path.realpath(base_path):
                raise UsageError(f"experts[{i}] adapter {e.adapter} is on base {abase}, not base_model {base_path}")
            sources.append(e.adapter)
            continue
        src = resolve_model_path(e.source_model)
        ecfg = _read_config(src, f"experts[{i}] source_model {e.source_model}")
        if ecfg.model_type != base_cfg.model_type:
            raise UsageError(f"experts[{i}] {e.source_model} is a {ecfg.model_type} model, base is {base_cfg.model_type}")
        for k in shape_keys:
            if getattr(ecfg, k, None) != getattr(base_cfg, k, None):
                raise UsageError(f"experts[{i}] {e.source_model} has {k}={getattr(ecfg, k, None)}, "
                                 f"base has {getattr(base_cfg, k, None)}")
        sources.append(src)
    return base_path, base_cfg, sources


def mixtral_config(base_cfg, num_experts: int, experts_per_token: int, dtype):
    """A MixtralConfig with the base's shapes, tokens and rope, E experts and top-k routing."""
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
            "rms_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
            "attention_dropout", "rope_parameters")
    kw = {k: getattr(base_cfg, k) for k in keep if getattr(base_cfg, k, None) is not None}
    kw["tie_word_embeddings"] = bool(getattr(base_cfg, "tie_word_embeddings", False))
    cfg = MixtralConfig(**kw, sliding_window=None, num_local_experts=num_experts,
                        num_experts_per_tok=experts_per_token, router_jitter_noise=0.0)
    cfg.architectures = ["MixtralForCausalLM"]
    cfg.dtype = dtype
    return cfg


# --------------------------------------------------------------------------- expert weights


def _mlp_weights(model) -> list[dict]:
    return [{p: getattr(layer.mlp, p).weight.detach().float().clone() for p in MLP_PARTS}
            for layer in model.model.layers]


def adapter_expert_mlp(base_path: str, adapter_dir: str) -> tuple[list[dict], list[str]]:
    """Merge an adapter into a fresh fp32 base; return its MLP weights and the dropped modules."""
    base = load_base_full_precision(base_path)
    model = PeftModel.from_pretrained(base, adapter_dir)
    dropped = set()
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and name.rsplit(".", 1)[-1] not in MLP_PARTS and len(module.lora_A):
            dropped.add(name.rsplit(".", 1)[-1])
    for name in (model.peft_config["default"].modules_to_save or []):
        dropped.add(f"{name} (modules_to_save)")
    merged = model.merge_and_unload()
    return _mlp_weights(merged), sorted(dropped)


def _apply_noise_and_scale(mlp: list[dict], e: ExpertSpec, gen) -> None:
    for layer in mlp:
        for p, w in layer.items():
            if e.noise_scale:
                w += torch.randn(w.shape, generator=gen) * e.noise_scale
            if p == "down_proj" and e.residual_scale is not None:
                w *= e.residual_scale


# --------------------------------------------------------------------------- build


def _load_prompting_model(base_path: str, quantize: bool):
    """The base that computes hidden-mode gates: NF4 when asked (and bnb can), on the GPU if any."""
    device = inference_device()
    if quantize:
        try:
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.bfloat16 if device == "cuda" else torch.float32)
            return AutoModelForCausalLM.from_pretrained(base_path, quantization_config=q, device_map=device)
        except Exception as err:  # bnb without a usable backend: the full-precision base still works
            log.warning("quantize_prompting: NF4 load failed (%s); using the full-precision base", err)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    return model.to(device) if device != "cpu" else model


def build_moe(spec: MoESpec, out_dir: str, overwrite: bool = False, max_shard_size: str = "2GB",
              config_text: Optional[str] = None) -> Path:
    """Assemble and save the MoE described by `spec`; returns out_dir."""
    check_out_dir(out_dir, overwrite)
    base_path, base_cfg, sources = _check_sources(spec)
    out_dtype = checkpoint_dtype(str(spec.dtype or "auto"), base_cfg)
    tok_src = next((e.adapter for e in spec.experts if e.adapter and
                    (Path(e.adapter) / "tokenizer_config.json").is_file()), base_path)
    tokenizer = AutoTokenizer.from_pretrained(tok_src)

    # Gates first: hidden mode may hold a (quantized) copy of the base on the GPU, freed before the
    # experts load; on CPU in fp32 the base itself does the prompting.
    L, H = base_cfg.num_hidden_layers, base_cfg.hidden_size
    model = embed = None
    base = load_base_full_precision(base_path)
    if spec.gate_mode == "hidden":
        on_cpu_fp32 = not spec.quantize_prompting and inference_device() == "cpu"
        model = base if on_cpu_fp32 else _load_prompting_model(base_path, spec.quantize_prompting)
    if spec.gate_mode == "cheap_embed":
        embed = base.get_input_embeddings().weight.detach()
    gates = compute_gates(spec.gate_mode, spec.experts, L, H, model=model, tokenizer=tokenizer, embed=embed,
                          prompt_format=spec.prompt_format, seed=spec.seed)
    del model
    warnings = [] if spec.gate_mode in ("random", "uniform_random") else \
        warn_parallel(gates, [e.name for e in spec.experts])

    cfg = mixtral_config(base_cfg, len(spec.experts), spec.experts_per_token, out_dtype)
    moe = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    moe_sd = moe.state_dict()
    with torch.no_grad():
        for k, v in base.state_dict().items():  # everything but the MLPs is the base's
            if ".mlp." not in k:
                moe_sd[k].copy_(v)
        for li, layer in enumerate(moe.model.layers):
            layer.mlp.gate.weight.copy_(gates[li])
        gen = torch.Generator().manual_seed(spec.seed)
        dropped_by_expert = {}
        for ei, (e, src) in enumerate(track(list(zip(spec.experts, sources)), description="experts")):
            if e.adapter:
                mlp, dropped = adapter_expert_mlp(base_path, src)
                if dropped:
                    log.warning("expert %d adapter %s: dropped non-MLP deltas on %s (attention, embeddings and "
                                "norms come from the base)", ei, e.adapter, ", ".join(dropped))
                    dropped_by_expert[e.name] = dropped
            elif os.path.realpath(src) == os.path.realpath(base_path):
                mlp = _mlp_weights(base)
            else:
                mlp = _mlp_weights(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32))
            _apply_noise_and_scale(mlp, e, gen)
            for li, layer in enumerate(moe.model.layers):
                w = mlp[li]
                layer.mlp.experts.gate_up_proj[ei].copy_(torch.cat([w["gate_proj"], w["up_proj"]], dim=0))
                layer.mlp.experts.down_proj[ei].copy_(w["down_proj"])
    del base
    moe.to(out_dtype)
    moe.config.dtype = out_dtype
    try:
        moe.generation_config = GenerationConfig.from_pretrained(base_path)
    except OSError:
        pass
    info = {"base_model": spec.base_model, "gate_mode": spec.gate_mode, "prompt_format": spec.prompt_format,
            "experts_per_token": spec.experts_per_token, "experts": [e.name for e in spec.experts],
            "dropped_non_mlp_deltas": dropped_by_expert, "gate_warnings": warnings}
    with atomic_out_dir(out_dir, overwrite) as tmp:
        moe.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        portable_config(tmp)  # copy_tokenizer writes 4.x-readable tokenizer files too
        copy_tokenizer(tmp, tok_src, base_path)
        (tmp / "moe_info.json").write_text(json.dumps(info, indent=2))
        if config_text is not None:
            (tmp / "mergekit_moe_config.yml").write_text(config_text)
    return Path(out_dir)
