"""What `models=[base, out/a/final, merged/, ...]` means, and loading each one for inference.

`base` is the base model of the adapters given (they must share one); an adapter loads on its own
base; anything else with a config.json (merged model, assembled MoE) or a hub id/alias loads as a
plain transformers model. Column names are short and unique: "base", then parent/name of each dir.
"""

from __future__ import annotations

import gc
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from finetune.errors import UsageError
from finetune.models.adapters import attach_adapter, check_adapter_fits, load_for_inference
from finetune.models.load import resolve_model_path


@dataclass
class Checkpoint:
    name: str
    """Column name in the scorecard."""
    path: str
    """Directory or hub id that is loaded (for an adapter: the adapter dir)."""
    kind: str
    """base, adapter or model (merged / MoE / any full checkpoint)."""
    base: Optional[str] = None
    """For an adapter: the base it was trained on (adapter_config.json)."""

    def to_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "kind": self.kind, "base": self.base}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _resolve_name(name: str) -> str:
    """An alias/hub id/dir -> what loads it; local dirs become absolute so bases compare equal."""
    p = Path(os.path.expanduser(name))
    if p.is_dir():
        return str(p.resolve())
    resolved = str(resolve_model_path(name))
    rp = Path(resolved)
    return str(rp.resolve()) if rp.is_dir() else resolved


def adapter_base(adapter_dir: Path) -> str:
    cfg_path = adapter_dir / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read adapter config {cfg_path}: {e}") from None
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise UsageError(f"{cfg_path} does not name its base model (base_model_name_or_path); "
                         f"pass base_model=NAME")
    return str(base)


def resolve_checkpoints(models: list[str], base_model: Optional[str] = None,
                        base: Optional[str] = None, recipe_model: Optional[str] = None) -> list[Checkpoint]:
    """`base` replaces the base every adapter records (it is then loaded onto that one);
    `recipe_model` (the recipe's model.name) is what `base` means when no adapter names one."""
    if not models:
        raise UsageError("models is empty: give e.g. models=[base,out/run/final]")
    ckpts: list[Checkpoint] = []
    for entry in models:
        entry = str(entry)
        if entry == "base":
            ckpts.append(Checkpoint("base", "", "base"))
            continue
        p = Path(os.path.expanduser(entry))
        if p.is_dir():
            if (p / "adapter_config.json").is_file():
                ckpts.append(Checkpoint("", str(p.resolve()), "adapter", _resolve_name(adapter_base(p))))
            elif (p / "config.json").is_file():
                ckpts.append(Checkpoint("", str(p.resolve()), "model"))
            else:
                raise UsageError(f"checkpoint {entry} has neither adapter_config.json (an adapter) nor "
                                 f"config.json (a model)")
        elif p.exists():
            raise UsageError(f"checkpoint {entry} is a file; give the checkpoint directory")
        elif entry.startswith(("/", ".", "~")) or entry.count("/") > 1 or not (_HUB_ID.match(entry) or "/" not in entry):
            raise UsageError(f"checkpoint not found: {entry} (no such directory)")
        else:
            ckpts.append(Checkpoint(entry, _resolve_name(entry), "model"))

    adapters = [c for c in ckpts if c.kind == "adapter"]
    for c in adapters if base else ():
        c.base = _resolve_name(base)
    bases = {c.base for c in adapters}
    if base_model is not None:
        want = _resolve_name(base_model)
        for c in adapters:
            if c.base != want:
                raise UsageError(f"adapter {c.path} was trained on {c.base}, not base_model={base_model}")
        base = want
    elif len(bases) > 1:
        a, b = adapters[0], next(c for c in adapters if c.base != adapters[0].base)
        raise UsageError(f"the adapters have different base models ({a.path} -> {a.base}; {b.path} -> {b.base}); "
                         f"evaluate them in separate runs")
    else:
        base = next(iter(bases), None)
    if base is None and recipe_model is not None and any(c.kind == "base" for c in ckpts):
        base = _resolve_name(recipe_model)
    for c in ckpts:
        if c.kind == "base":
            if base is None:
                raise UsageError("'base' means the base model of the adapters given (or of recipe=), but models= has "
                                 "no adapter; add one, name the model itself (e.g. models=[tiny,...]), "
                                 "set base_model= or give recipe=")
            c.path = base
    _name_columns(ckpts)
    return ckpts


def _name_columns(ckpts: list[Checkpoint]) -> None:
    """'base', then parent/name of each dir (more parents only where needed to be unique)."""
    def label(c: Checkpoint, depth: int) -> str:
        if c.kind == "base":
            return "base"
        if c.name:  # a hub id or alias: as the user wrote it
            return c.name
        parts = Path(c.path).parts
        return "/".join(parts[-depth:]) if Path(c.path).is_absolute() else c.path

    depth = {id(c): 2 for c in ckpts}
    for _ in range(8):
        names = [label(c, depth[id(c)]) for c in ckpts]
        dup = {n for n in names if names.count(n) > 1}
        if not dup:
            break
        for c, n in zip(ckpts, names):
            if n in dup and c.kind != "base":
                depth[id(c)] += 1
    seen: dict[str, int] = {}
    for c in ckpts:
        n = label(c, depth[id(c)])
        seen[n] = seen.get(n, 0) + 1
        c.name = n if seen[n] == 1 else f"{n}#{seen[n]}"


def check_adapters_fit(ckpts: list[Checkpoint]) -> None:
    """Fail before any scoring when an adapter's tensors do not fit its base (shapes checked on a
    weightless meta-device copy of the base, so this costs no memory)."""
    skeletons: dict[str, torch.nn.Module] = {}
    for c in ckpts:
        if c.kind != "adapter":
            continue
        if c.base not in skeletons:
            try:
                config = AutoConfig.from_pretrained(c.base)
                with torch.device("meta"):
                    skeletons[c.base] = AutoModelForCausalLM.from_config(config)
            except Exception:  # noqa: BLE001 - unusual architectures: the full load checks it later
                continue
        check_adapter_fits(c.path, skeletons[c.base], c.base)


def load(ckpt: Checkpoint, device: str, dtype):
    """(model in eval mode, tokenizer) for one checkpoint: finetune.models.adapters.load_for_inference,
    which puts an adapter on its base after the same fit check."""
    model, tok = load_for_inference(ckpt.path, dtype=dtype, device=device,
                                    base=ckpt.base if ckpt.kind == "adapter" else None)
    model.eval()
    return model, tok


def eval_order(ckpts: list[Checkpoint]) -> list[Checkpoint]:
    """The order to load checkpoints in so that their shared base loads once: the others first, then
    the plain base (column 'base', or the same model named), then the adapters on it."""
    base = next((c.base for c in ckpts if c.kind == "adapter"), None)
    return sorted(ckpts, key=lambda c: (c.kind == "adapter" or c.path == base, c.kind == "adapter"))


class Loader:
    """One checkpoint in memory at a time, each base loaded once: an adapter whose base is the
    model in memory (loaded plain, or under the previous adapter) is swapped onto it
    (finetune.models.adapters.attach_adapter) instead of loading the base from disk again.
    Minutes per adapter at 7B, and the same scores: a LoRA layer with only the new adapter
    active computes what a fresh load computes."""

    def __init__(self, device: str, dtype):
        self.device, self.dtype = device, dtype
        self.model = None
        self.base: Optional[str] = None  # the base in self.model, while adapters may go on it
        self._adapters = 0

    def reuses_base(self, ckpt: Checkpoint) -> bool:
        return ckpt.kind == "adapter" and self.model is not None and self.base == ckpt.base

    def load(self, ckpt: Checkpoint):
        """(model in eval mode, tokenizer) for `ckpt`; what `load` gives, without reloading a base."""
        if ckpt.kind != "adapter":
            self.release()
            self.model, tok = load(ckpt, self.device, self.dtype)
            self.base = ckpt.path
            return self.model, tok
        if not self.reuses_base(ckpt):
            self.release()
            self.model, _ = load_for_inference(ckpt.base, dtype=self.dtype, device=self.device)
            self.base = ckpt.base
        vocab = self.model.get_input_embeddings().weight.shape[0]
        self._adapters += 1
        self.model, tok = attach_adapter(self.model, ckpt.path, ckpt.base, str(resolve_model_path(ckpt.base)),
                                         adapter_name=f"adapter{self._adapters}")
        if self.model.get_input_embeddings().weight.shape[0] != vocab:
            self.base = None  # grown for this adapter's tokenizer: no longer the base the next one expects
        return self.model, tok

    def release(self) -> None:
        self.model, self.base = None, None
        gc.collect()  # peft and transformers modules hold reference cycles
        if str(self.device).startswith("cuda"):
            torch.cuda.empty_cache()
