"""Build a Mixtral-style MoE from fine-tunes of one base (mergekit-moe style):
`finetune moe config=moe.yaml out_dir=OUT` (the YAML is parsed by finetune.moe.spec).

The YAML uses mergekit-moe's keys, so existing configs work:

    base_model: path-or-hub-id
    gate_mode: hidden            # hidden | hidden_avg | hidden_last | cheap_embed | random | uniform_random
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
in every layer comes from expert e (Llama gate_proj/up_proj/down_proj = Mixtral w1/w3/w2). The
checkpoint uses the classic per-expert `block_sparse_moe.experts.N.w1/w2/w3` keys and
`block_sparse_moe.gate.weight` (what transformers 5.x `save_pretrained` writes for its fused
`mlp.experts.gate_up_proj`/`down_proj`, and what every loader reads).

Streaming (the only build path): no model is ever whole in memory. Inputs are read a tensor at a
time from safetensors, the output's shards are planned up front and each tensor is written at its
place as soon as it exists (finetune.moe.stream); expert by expert, layer by layer, an adapter's
LoRA delta is added to the base's MLP weight in fp32 (peft's merge arithmetic) and a full-model
expert's MLP weight is read the same way. The result is bit-identical to loading everything in
fp32, merging with peft and saving a filled MixtralForCausalLM (tests/moe/test_stream_equal.py).
Peak memory is one layer's MLP in fp32 plus, for `gate_mode: hidden`, the prompting copy of the
base (fp32 for small bases, the stored dtype beyond ~2 GB of fp32 weights), freed before the
experts are read.

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

import gc
import json
import logging
import os
import re
from pathlib import Path
from typing import Optional

import torch
from rich.progress import track
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, MixtralConfig

from finetune.errors import UsageError
from finetune.fs import atomic_out_dir, check_out_dir, out_dir_lock, write_error
from finetune.manifest import check_input
from finetune.models.adapters import read_adapter_config
from finetune.models.load import copy_tokenizer, load_inference_model, read_tokenizer, resolve_model_path
from finetune.moe.gates import HIDDEN_MODES, compute_gates, warn_gates
from finetune.moe.spec import SUPPORTED_BASES, ExpertSpec, MoESpec
from finetune.portable import portable_config
from finetune.moe.stream import AdapterDeltas, ModelTensors, ShardWriter
from finetune.runtime import checkpoint_dtype, inference_device, prompting_dtype

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
    if getattr(base_cfg, "quantization_config", None):
        raise UsageError(f"base_model {spec.base_model} is stored quantized; the MoE needs its full-precision weights")
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
        if getattr(ecfg, "quantization_config", None):
            raise UsageError(f"experts[{i}] {e.source_model} is stored quantized; the MoE needs full-precision weights")
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


# --------------------------------------------------------------------------- layout


def _disk_name(key: str) -> str:
    """The classic on-disk Mixtral name of a non-expert tensor (router included)."""
    return key.replace(".mlp.gate.", ".block_sparse_moe.gate.")


def output_layout(cfg) -> dict[str, torch.Tensor]:
    """Every tensor the MoE checkpoint holds, as meta tensors in the output dtype, by on-disk name.

    Taken from a MixtralForCausalLM built on the meta device, so the names and shapes are
    transformers' own; the fused expert tensors are listed per expert as w1 (gate_proj),
    w3 (up_proj) and w2 (down_proj), which is what `save_pretrained` writes for them.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=cfg.dtype)
    layout = {}
    for key, t in model.state_dict().items():
        if cfg.tie_word_embeddings and key == "lm_head.weight":
            continue  # tied: save_pretrained stores the embedding once
        m = re.match(r"(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$", key)
        if not m:
            layout[_disk_name(key)] = t
            continue
        for ei in range(t.shape[0]):
            pre = f"{m.group(1)}.block_sparse_moe.experts.{ei}"
            if m.group(2) == "gate_up_proj":
                half = t.shape[1] // 2
                layout[f"{pre}.w1.weight"], layout[f"{pre}.w3.weight"] = t[ei, :half], t[ei, half:]
            else:
                layout[f"{pre}.w2.weight"] = t[ei]
    return layout


# Llama MLP projection -> Mixtral expert weight
EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def _expert_layers(e: ExpertSpec, src: str, base: ModelTensors, base_path: str, num_layers: int):
    """Yield (layer, {part: fp32 weight}) of one expert, a layer at a time, and its dropped modules."""
    deltas = reader = None
    if e.adapter:
        deltas = AdapterDeltas(src, read_adapter_config(src), MLP_PARTS)
        reader = base
    elif os.path.realpath(src) == os.path.realpath(base_path):
        reader = base
    else:
        reader = ModelTensors(src, f"source_model {e.source_model}")
    dropped = deltas.dropped if deltas else []

    def layers():
        for li in range(num_layers):
            out = {}
            for p in MLP_PARTS:
                module = f"model.layers.{li}.mlp.{p}"
                w = reader.get(f"{module}.weight").float()
                d = deltas.delta(module) if deltas else None
                out[p] = w if d is None else w + d
            yield li, out
    return layers(), dropped


def _apply_noise_and_scale(weights: dict, e: ExpertSpec, gen) -> None:
    for p, w in weights.items():
        if e.noise_scale:
            w += torch.randn(w.shape, generator=gen) * e.noise_scale
        if p == "down_proj" and e.residual_scale is not None:
            w *= e.residual_scale


# --------------------------------------------------------------------------- build


def _load_prompting_model(base_path: str, quantize: bool, dtype: torch.dtype):
    """The base that computes hidden-mode gates: NF4 when asked (and bnb can), on the GPU if any."""
    device = inference_device()
    if quantize:
        try:
            return load_inference_model(base_path, dtype, device, nf4=True)
        except Exception as err:  # bnb without a usable backend: the full-precision base still works
            log.warning("quantize_prompting: NF4 load failed (%s); using the full-precision base", err)
    return load_inference_model(base_path, dtype, device)


def _gates(spec: MoESpec, base_path: str, base_cfg, base: ModelTensors, tokenizer) -> torch.Tensor:
    L, H = base_cfg.num_hidden_layers, base_cfg.hidden_size
    model = embed = None
    if spec.gate_mode in HIDDEN_MODES:
        model = _load_prompting_model(base_path, spec.quantize_prompting,
                                      prompting_dtype(base_cfg, base.dtype("model.embed_tokens.weight")))
    if spec.gate_mode == "cheap_embed":
        embed = base.get("model.embed_tokens.weight")
    return compute_gates(spec.gate_mode, spec.experts, L, H, model=model, tokenizer=tokenizer, embed=embed,
                         prompt_format=spec.prompt_format, seed=spec.seed)


def write_moe_config(cfg, out_dir: Path) -> None:
    """config.json of the MoE (the one place it is written), readable by transformers 4.x and 5.x."""
    cfg.save_pretrained(out_dir)
    portable_config(out_dir)


def build_moe(spec: MoESpec, out_dir: str, overwrite: bool = False, max_shard_size: str = "2GB",
              config_text: Optional[str] = None) -> Path:
    """Assemble and save the MoE described by `spec`, streaming (module docstring); returns out_dir."""
    check_out_dir(out_dir, overwrite, whole=True)
    base_path, base_cfg, sources = _check_sources(spec)
    check_input(base_path, "base_model")
    for i, src in enumerate(sources):
        check_input(src, f"experts[{i}]")
    with out_dir_lock(out_dir):  # one writer per out_dir, as training
        return _build(spec, out_dir, overwrite, max_shard_size, config_text, base_path, base_cfg, sources)


def _build(spec: MoESpec, out_dir: str, overwrite: bool, max_shard_size: str, config_text: Optional[str],
           base_path, base_cfg, sources) -> Path:
    out_dtype = checkpoint_dtype(str(spec.dtype or "auto"), base_cfg)
    tok_src = next((e.adapter for e in spec.experts if e.adapter and
                    (Path(e.adapter) / "tokenizer_config.json").is_file()), base_path)
    tokenizer = read_tokenizer(tok_src)
    base = ModelTensors(base_path, f"base_model {spec.base_model}")
    # Gates first: hidden mode holds a copy of the base (freed before any expert is read).
    gates = _gates(spec, base_path, base_cfg, base, tokenizer)
    gc.collect()
    warnings = [] if spec.gate_mode in ("random", "uniform_random") else \
        warn_gates(gates, [e.name for e in spec.experts])

    cfg = mixtral_config(base_cfg, len(spec.experts), spec.experts_per_token, out_dtype)
    layout = output_layout(cfg)
    dropped_by_expert = {}
    with write_error(out_dir), atomic_out_dir(out_dir, overwrite) as tmp:
        writer = ShardWriter(tmp, layout, max_shard_size)
        for key in layout:  # embeddings, attention, norms, lm_head: the base's
            if ".block_sparse_moe." not in key:
                writer.write(key, base.get(key).float().to(out_dtype))
        for li in range(base_cfg.num_hidden_layers):
            writer.write(f"model.layers.{li}.block_sparse_moe.gate.weight", gates[li].float().to(out_dtype))
        gen = torch.Generator().manual_seed(spec.seed)  # noise: expert by expert, layer by layer
        for ei, (e, src) in enumerate(track(list(zip(spec.experts, sources)), description="experts")):
            layers, dropped = _expert_layers(e, src, base, base_path, base_cfg.num_hidden_layers)
            if dropped:
                log.warning("expert %d adapter %s: dropped non-MLP deltas on %s (attention, embeddings and "
                            "norms come from the base)", ei, e.adapter, ", ".join(dropped))
                dropped_by_expert[e.name] = dropped
            for li, weights in layers:
                _apply_noise_and_scale(weights, e, gen)
                for p, w in weights.items():
                    key = f"model.layers.{li}.block_sparse_moe.experts.{ei}.{EXPERT_NAMES[p]}.weight"
                    writer.write(key, w.to(out_dtype))
        writer.finish()
        write_moe_config(cfg, tmp)
        try:
            GenerationConfig.from_pretrained(base_path).save_pretrained(tmp)
        except OSError:
            pass
        copy_tokenizer(tmp, tok_src, base_path)
        info = {"base_model": spec.base_model, "gate_mode": spec.gate_mode, "prompt_format": spec.prompt_format,
                "experts_per_token": spec.experts_per_token, "experts": [e.name for e in spec.experts],
                "dropped_non_mlp_deltas": dropped_by_expert, "gate_warnings": warnings}
        (tmp / "moe_info.json").write_text(json.dumps(info, indent=2))
        if config_text is not None:
            (tmp / "mergekit_moe_config.yml").write_text(config_text)
    return Path(out_dir)
