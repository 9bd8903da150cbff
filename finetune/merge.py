"""Fold one LoRA adapter into its base, or combine several adapters into one (`finetune merge`).

Merging into the base always loads the base unquantized and merges in fp32: a QLoRA adapter was
trained against NF4 weights, but folding its delta into 4-bit storage would re-quantize (and lose)
it, so the delta goes into a full-precision base and only the result is cast to `dtype`. Which
full-precision weights is `base_weights`: `original` (the checkpoint's), or `dequantized` (the NF4
weights the QLoRA adapter was trained against, dequantized: finetune.models.trained); `auto` takes
`dequantized` for an adapter trained on an NF4 base (closer to the adapter as trained, measured by
finetune.eval.fidelity; README "Merge"), `original` otherwise.
The output is a plain transformers checkpoint (sharded safetensors + config + tokenizer +
generation config) that `AutoModelForCausalLM.from_pretrained` loads with no project code.

Combining uses peft's `add_weighted_adapter` unchanged; this module only checks up front what peft
would otherwise report late or vaguely (ranks, bases, target modules) and writes a PEFT adapter dir.

Outputs are written to a temporary sibling directory and renamed into place, so an interrupted
merge never leaves a half-written checkpoint under `out_dir`.
"""

from __future__ import annotations

import json
import logging
import typing
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from peft import PeftModel

from finetune.errors import UsageError
from finetune.fs import atomic_out_dir, check_apart, check_out_dir, out_dir_lock, write_error
from finetune.manifest import check_input, sha256
from finetune.progress import doing
from finetune.models.adapters import (
    adapter_base_path,
    adapter_shapes,
    check_adapter_fits,
    read_adapter_config,
)
from finetune.models.load import copy_tokenizer, load_full_precision, resolve_model_path
from finetune.models.trained import dequantized_base, trained_quant
from finetune.portable import portable_config
from finetune.runtime import checkpoint_dtype

log = logging.getLogger(__name__)

Method = Literal["linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                 "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"]  # peft's combination types
METHODS = typing.get_args(Method)
SignMethod = Literal["total", "frequency"]  # ties/dare_ties sign election
# peft requires one common rank for these (it sums lora_A/lora_B factors directly).
EQUAL_RANK_METHODS = {"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"}
DENSITY_METHODS = {m for m in METHODS if m.startswith(("ties", "dare", "magnitude"))}
BaseWeights = Literal["auto", "original", "dequantized"]


def merge_base_weights(adapter_dir: str, base_weights: str = "auto") -> str:
    """original or dequantized: what `auto` means for this adapter (dequantized when trained on NF4)."""
    if base_weights != "auto":
        return base_weights
    return "dequantized" if trained_quant(adapter_dir) == "nf4" else "original"




# --------------------------------------------------------------------------- merge into base


def merge_adapter(adapter_dir: str, out_dir: str, dtype: str = "auto", overwrite: bool = False,
                  max_shard_size: Union[int, str] = "2GB", base: Optional[str] = None,
                  base_weights: BaseWeights = "auto") -> Path:
    """Merge one LoRA adapter into its full-precision base (or `base`) and save a standalone checkpoint."""
    base_path = resolve_model_path(base) if base else adapter_base_path(adapter_dir)
    check_apart(out_dir, [("adapter", adapter_dir), ("base model", base_path)])
    check_out_dir(out_dir, overwrite, whole=True)
    check_input(adapter_dir, "adapter")
    check_input(base_path, "base model")
    weights = merge_base_weights(adapter_dir, base_weights)
    with out_dir_lock(out_dir), doing(f"merging {adapter_dir} into {base_path}",
                                      f"nothing was written to {out_dir}; run the same command again"):
        base = dequantized_base(adapter_dir, base_path) if weights == "dequantized" else load_full_precision(base_path)
        out_dtype = checkpoint_dtype(dtype, base.config)
        check_adapter_fits(adapter_dir, base, base_path)  # one line naming the module, not torch's size dump
        model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)
        merged = model.merge_and_unload(safe_merge=True)
        merged.to(out_dtype)
        merged.config.dtype = out_dtype
        with write_error(out_dir), atomic_out_dir(out_dir, overwrite) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
            portable_config(tmp)
            copy_tokenizer(tmp, adapter_dir, base_path)
    log.info("merged %s into %s (%s weights) -> %s", adapter_dir, base_path, weights, out_dir)
    return Path(out_dir)


# --------------------------------------------------------------------------- combine adapters


def _lora_shapes(adapter_dir: str) -> dict[str, tuple[int, int, int]]:
    """module path -> (rank, in_features, out_features), read from the adapter's tensor headers."""
    out: dict[str, list] = {}
    for key, shape in adapter_shapes(adapter_dir).items():
        for part, idx in ((".lora_A.", 0), (".lora_B.", 1)):
            if part in key:
                mod = key.split(part)[0]
                out.setdefault(mod, [None, None])[idx] = shape
    res = {}
    for mod, (a, b) in out.items():
        if a is not None and b is not None:
            res[mod] = (a[0], a[1], b[0])  # lora_A: (r, in), lora_B: (out, r)
    return res


def check_combinable(adapters: list[str], method: str) -> list[dict]:
    """Refuse combinations peft would reject late or silently get wrong; return the configs."""
    if len(adapters) < 2:
        raise UsageError(f"adapters= needs at least 2 adapter directories, got {len(adapters)}")
    cfgs = [read_adapter_config(a) for a in adapters]
    bases = [resolve_model_path(c["base_model_name_or_path"]) for c in cfgs]
    if len(set(bases)) > 1:
        pairs = ", ".join(f"{a} -> {b}" for a, b in zip(adapters, bases))
        raise UsageError(f"adapters are on different base models: {pairs}")
    shapes = [_lora_shapes(a) for a in adapters]
    modules = [set(s) for s in shapes]
    if any(m != modules[0] for m in modules[1:]):
        i = next(i for i, m in enumerate(modules) if m != modules[0])
        only0 = sorted(modules[0] - modules[i])[:3]
        onlyi = sorted(modules[i] - modules[0])[:3]
        raise UsageError(f"adapters target different modules: {adapters[0]} has {only0 or 'no extra'}, "
                         f"{adapters[i]} has {onlyi or 'no extra'} that the other lacks")
    for mod in modules[0]:
        dims = {(s[mod][1], s[mod][2]) for s in shapes}
        if len(dims) > 1:
            raise UsageError(f"adapters disagree on the shape of {mod} ({sorted(dims)}): not the same base")
    ranks = [c.get("r") for c in cfgs]
    patterns = [bool(c.get("rank_pattern")) for c in cfgs]
    if method in EQUAL_RANK_METHODS and (len(set(ranks)) > 1 or any(patterns)):
        got = ", ".join(f"r={r} ({a})" for r, a in zip(ranks, adapters))
        raise UsageError(f"method={method} needs equal LoRA ranks, got {got}; use method=cat or an *svd method")
    return cfgs


def check_no_cancelling(adapters: list[str], weights: list[float]) -> None:
    """Refuse weights under which the same adapter (the same weights file, by checksum, whatever
    its folder) adds up to nothing for every adapter: the result would change nothing, as all-zero
    weights would (e.g. adapters=[A,A] weights=[1,-1])."""
    totals: dict[str, list] = {}
    for a, w in zip(adapters, weights):
        f = Path(a) / "adapter_model.safetensors"
        key = sha256(f) if f.is_file() else str(Path(a).resolve())
        totals.setdefault(key, [0.0, []])
        totals[key][0] += w
        totals[key][1].append(f"{a} ({w:g})")
    if all(abs(t) < 1e-12 for t, _ in totals.values()):
        pairs = "; ".join(" + ".join(names) for _, names in totals.values())
        raise UsageError(f"weights cancel: {pairs} add up to 0, so the combined adapter would change nothing")


def combine_adapters(adapters: list[str], out_dir: str, weights: Optional[list[float]] = None,
                     method: Method = "linear", density: Optional[float] = None, svd_rank: Optional[int] = None,
                     majority_sign_method: SignMethod = "total", seed: int = 0, overwrite: bool = False) -> Path:
    """Combine LoRA adapters on one base into a new adapter with peft's add_weighted_adapter.

    Single values (method, density's range, finite weights) are checked where they are parsed,
    by the command's typed arguments; what spans several parameters is checked here."""
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise UsageError(f"weights has {len(weights)} values for {len(adapters)} adapters")
    if not any(weights):
        raise UsageError(f"weights are all 0 ({weights}): the combined adapter would change nothing")
    if density is not None and method not in DENSITY_METHODS:
        raise UsageError(f"density= applies to the ties*, dare* and magnitude_prune* methods, not method={method}")
    if svd_rank is not None and not method.endswith("svd"):
        raise UsageError(f"svd_rank= applies to the *svd methods, not method={method}")
    if method in DENSITY_METHODS and density is None:
        raise UsageError(f"method={method} needs density=... (fraction of delta entries kept, e.g. 0.5)")
    check_apart(out_dir, [("adapter", a) for a in adapters])
    check_out_dir(out_dir, overwrite, whole=True)
    for a in adapters:
        check_input(a, "adapter")
    cfgs = check_combinable(adapters, method)
    check_no_cancelling(adapters, weights)
    check_apart(out_dir, [("base model", resolve_model_path(cfgs[0]["base_model_name_or_path"]))])
    with out_dir_lock(out_dir), doing(f"combining {len(adapters)} adapters",
                                      f"nothing was written to {out_dir}; run the same command again"):
        return _combine(adapters, out_dir, cfgs, weights, method, density, svd_rank, majority_sign_method, seed,
                        overwrite)


def _combine(adapters, out_dir, cfgs, weights, method, density, svd_rank, majority_sign_method, seed,
             overwrite) -> Path:
    if method.endswith("svd"):  # what peft uses when none is given; recorded, so merge_info says what ran
        svd_rank = svd_rank or max(int(c.get("r") or 0) for c in cfgs)
    base = load_full_precision(resolve_model_path(cfgs[0]["base_model_name_or_path"]))
    names = [f"a{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(base, adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        model.load_adapter(path, adapter_name=name)
    torch.manual_seed(seed)
    # Named "default" so save_pretrained writes it at out_dir's top level, not in a subfolder.
    try:
        model.add_weighted_adapter(names, weights, "default", combination_type=method, svd_rank=svd_rank,
                                   density=density, majority_sign_method=majority_sign_method)
    except ValueError as e:
        raise UsageError(f"peft refused method={method}: {str(e).splitlines()[0]}") from None
    with write_error(out_dir), atomic_out_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp, selected_adapters=["default"])
        cfg_file = tmp / "adapter_config.json"
        saved = json.loads(cfg_file.read_text())
        saved["base_model_name_or_path"] = cfgs[0]["base_model_name_or_path"]
        cfg_file.write_text(json.dumps(saved, indent=2, sort_keys=True))
        tok_src = next((a for a in adapters if (Path(a) / "tokenizer_config.json").is_file()), None)
        if tok_src:
            copy_tokenizer(tmp, tok_src)
        (tmp / "merge_info.json").write_text(json.dumps(
            {"adapters": [str(a) for a in adapters], "weights": weights, "method": method, "density": density,
             "svd_rank": svd_rank, "majority_sign_method": majority_sign_method, "seed": seed}, indent=2))
    return Path(out_dir)
