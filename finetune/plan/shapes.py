"""Model shapes for the planner: the numbers memory depends on, read offline and torch-free.

From a local HF config.json (a directory or the HF hub cache), else litgpt's config registry
(its config.py loaded as a single file so litgpt's torch-importing package __init__ never runs).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from huggingface_hub import try_to_load_from_cache

from finetune.errors import UsageError
from finetune.fs import cache_root
from finetune.models.tiny_spec import TINY_CONFIG, VOCAB_SIZE
from finetune.plan.moe import planned_moe

_ALIASES = {"tiny", "smollm2-135m"}
# litgpt's registry does not record tied embeddings; these families tie them in their HF configs.
_TIED = re.compile(r"llama-3\.2-[13]b|qwen2\.5-(0\.5|1\.5|3)b|smollm|gemma", re.I)


@dataclass(frozen=True)
class Shape:
    """The numbers memory depends on, for a Llama-style decoder."""

    name: str
    n_layer: int
    hidden: int
    n_head: int
    n_kv_head: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False
    gated_mlp: bool = True
    n_expert: int = 0
    expert_top_k: int = 0
    context: Optional[int] = None  # tokens its positions are trained for (context_length)

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    def linears(self) -> dict[str, tuple[int, int, int]]:
        """name -> (in_features, out_features, copies per layer) of every block linear."""
        h, i, e = self.hidden, self.intermediate, max(self.n_expert, 1)
        out = {"q": (h, self.q_dim, 1), "k": (h, self.kv_dim, 1), "v": (h, self.kv_dim, 1),
               "o": (self.q_dim, h, 1), "up": (h, i, e), "down": (i, h, e)}
        if self.gated_mlp:
            out["gate"] = (h, i, e)
        return out

    def n_params(self) -> int:
        block = sum(a * b * n for a, b, n in self.linears().values()) + 2 * self.hidden
        block += self.hidden * self.n_expert + (self.q_dim + 2 * self.kv_dim) * self.qkv_bias
        return self.n_layer * block + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


# --------------------------------------------------------------------------- model shapes


def context_length(cfg: dict) -> Optional[int]:
    """Tokens a model's positions are trained for, from its config.json: max_position_embeddings,
    times the RoPE scaling factor when the config scales beyond it (linear/dynamic/yarn without an
    original_max_position_embeddings, i.e. max_position_embeddings is the unscaled length)."""
    ctx = cfg.get("max_position_embeddings")
    if not isinstance(ctx, int) or isinstance(ctx, bool) or ctx <= 0:
        return None
    scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in ("linear", "dynamic", "yarn") and "original_max_position_embeddings" not in scaling:
        ctx = int(ctx * float(scaling.get("factor", 1.0)))
    return ctx


def _shape_from_hf(cfg: dict, name: str) -> Shape:
    cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
    try:
        h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        mtype = cfg.get("model_type", "")
        return Shape(
            name=name, n_layer=int(cfg["num_hidden_layers"]), hidden=h, n_head=heads,
            n_kv_head=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or h // heads),
            intermediate=int(cfg.get("intermediate_size") or 4 * h), vocab=int(cfg["vocab_size"]),
            # HF's PretrainedConfig defaults to tied, Llama/Mistral/Qwen2 classes to untied.
            tied=bool(cfg.get("tie_word_embeddings", mtype not in ("llama", "mistral", "qwen2", "mixtral"))),
            qkv_bias=bool(cfg.get("attention_bias", mtype == "qwen2")),
            gated_mlp=mtype not in ("gpt_neox", "gpt2", "phi"),
            n_expert=int(cfg.get("num_local_experts") or 0),
            expert_top_k=int(cfg.get("num_experts_per_tok") or 0),
            context=context_length(cfg))
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"model config for '{name}' lacks or mangles {e}; cannot plan it") from None


@functools.lru_cache(maxsize=1)
def _litgpt_module():
    """litgpt/config.py loaded on its own: `import litgpt` would import torch and the model."""
    spec = importlib.util.find_spec("litgpt")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "config.py"
    mod_spec = importlib.util.spec_from_file_location("_finetune_litgpt_config", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


_REGISTRY: Optional[dict[str, dict]] = None


def _registry() -> dict[str, dict]:
    """Lower-cased litgpt name, HF name and org/name (also without 'Meta-') -> litgpt config dict."""
    global _REGISTRY
    if _REGISTRY is None:
        mod = _litgpt_module()
        reg: dict[str, dict] = {}
        for c in (mod.configs if mod else []):
            hf = c.get("hf_config", {})
            keys = {c["name"], hf.get("name", ""), f"{hf.get('org', '')}/{hf.get('name', '')}"}
            # HF renamed meta-llama/Meta-Llama-3.1-8B to meta-llama/Llama-3.1-8B.
            keys |= {k.replace("Meta-Llama", "Llama") for k in keys}
            for k in keys:
                if k and not k.startswith("/"):
                    reg.setdefault(k.lower(), c)
        _REGISTRY = reg
    return _REGISTRY


def _shape_from_litgpt(c: dict) -> Shape:
    mod = _litgpt_module()
    lc = mod.Config(**c)
    return Shape(
        name=f"{lc.hf_config.get('org', '')}/{lc.hf_config.get('name', lc.name)}".strip("/"),
        n_layer=lc.n_layer, hidden=lc.n_embd, n_head=lc.n_head, n_kv_head=lc.n_query_groups,
        head_dim=lc.head_size, intermediate=lc.moe_intermediate_size or lc.intermediate_size,
        vocab=lc.padded_vocab_size, tied=bool(_TIED.search(lc.name)), qkv_bias=lc.attn_bias,
        gated_mlp=lc.mlp_class_name in ("LLaMAMLP", "GemmaMLP", "LLaMAMoE"),
        n_expert=lc.n_expert, expert_top_k=lc.n_expert_per_token, context=lc.block_size)


@functools.lru_cache(maxsize=64)
def model_shape(name: str, revision: Optional[str] = None) -> Shape:
    """Shape of `name`: alias, local dir, HF hub cache, else litgpt's registry; offline always."""
    if name == "tiny":
        cached = cache_root() / "models" / "tiny-llama-v1" / "config.json"
        if cached.is_file():  # the real one, if built; else the same numbers without building it
            return _shape_from_hf(json.loads(cached.read_text()), "tiny")
        return _shape_from_hf(dict(TINY_CONFIG, vocab_size=VOCAB_SIZE, model_type="llama"), "tiny")
    if name == "smollm2-135m":
        # HuggingFaceTB/SmolLM2-135M-Instruct config.json (same numbers as litgpt's SmolLM2-135M).
        return Shape("smollm2-135m", n_layer=30, hidden=576, n_head=9, n_kv_head=3, head_dim=64,
                     intermediate=1536, vocab=49152, tied=True, context=8192)
    moe = planned_moe(name, model_shape)  # "8x<base>": a MoE not built yet (finetune.plan.moe)
    if moe is not None:
        return moe
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UsageError(f"model directory {name} has no config.json")
        return _shape_from_hf(json.loads((local / "config.json").read_text()), name)
    if name.count("/") == 1:
        try:
            hit = try_to_load_from_cache(name, "config.json", revision=revision)
            if isinstance(hit, str):
                return _shape_from_hf(json.loads(Path(hit).read_text()), name)
        except (OSError, ValueError):
            pass
    reg = _registry()
    key = name.lower()
    if key not in reg and "/" in key and key.split("/", 1)[1] in reg:
        key = key.split("/", 1)[1]
    if key in reg:
        return dataclasses.replace(_shape_from_litgpt(reg[key]), name=name)
    choices = sorted(_ALIASES | {f"{c['hf_config']['org']}/{c['hf_config']['name']}"
                                 for c in reg.values() if c.get("hf_config")})
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5) or \
        difflib.get_close_matches(name.split("/")[-1], [c.split("/")[-1] for c in choices], n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UsageError(f"model.name: unknown model '{name}'{hint}; give a local dir with config.json "
                     "or a name litgpt knows")
