"""PEFT LoRA adapters on disk: read and check them, and load any checkpoint for inference.

An adapter dir is read through its adapter_config.json and safetensors header only, so checks
(does it fit this base?) cost no weights; `load_for_inference` puts it on its recorded base.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional, Union

import torch
from peft import PeftModel
from safetensors import safe_open

from finetune.config import Config
from finetune.errors import UsageError, first_line
from finetune.models.load import (
    hub_kwargs,
    load_pretrained,
    loading_errors,
    resolve_model_path,
    sync_special_tokens,
    tokenizer_from,
)

log = logging.getLogger(__name__)


def read_adapter_config(adapter_dir: Union[str, Path]) -> dict:
    """adapter_config.json of a PEFT LoRA adapter dir, with one-line errors for each way it is wrong."""
    d = Path(os.path.expanduser(str(adapter_dir)))
    if d.exists() and not d.is_dir():
        hint = f"; the adapter is the folder {d.parent}" if d.name == "adapter_config.json" or d.name.startswith("adapter_model.") else ""
        raise UsageError(f"{adapter_dir} is a file, not an adapter directory{hint}")
    if not d.is_dir():
        raise UsageError(f"adapter directory not found: {adapter_dir}")
    f = d / "adapter_config.json"
    if not f.is_file():
        raise UsageError(f"{adapter_dir} is not a PEFT adapter (no adapter_config.json)")
    if not any((d / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin")):
        raise UsageError(f"{adapter_dir} has no adapter weights (adapter_model.safetensors)")
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8 text
        raise UsageError(f"cannot read {f}: {first_line(e)}") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"{f} is not a JSON object of adapter settings")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UsageError(f"{adapter_dir}: only LoRA adapters are supported, got peft_type {cfg.get('peft_type')}")
    if not cfg.get("base_model_name_or_path"):
        raise UsageError(f"{f} has no base_model_name_or_path")
    return cfg


def check_start_adapter(cfg: Config) -> None:
    """model.adapter, when set, is a LoRA adapter whose shape the recipe's lora.r and lora.alpha
    agree with (training continues it as it is). One UsageError line naming model.adapter otherwise."""
    path = cfg.model.adapter
    if not path:
        return
    try:
        saved = read_adapter_config(path)
    except UsageError as e:
        raise UsageError(f"model.adapter: {e}") from None
    for key, name, ours in (("r", "lora.r", cfg.lora.r), ("lora_alpha", "lora.alpha", cfg.lora.alpha)):
        if saved.get(key) is not None and saved[key] != ours:
            raise UsageError(f"model.adapter {path} has {key}={saved[key]} but {name}={ours}: training continues "
                             f"the adapter as it is; set {name}={saved[key]}")


def adapter_shapes(adapter_dir: Union[str, Path]) -> dict[str, tuple]:
    """Saved tensor name -> shape, without loading the tensors."""
    d = Path(adapter_dir)
    st = d / "adapter_model.safetensors"
    if st.is_file():
        with safe_open(str(st), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    binf = d / "adapter_model.bin"
    if binf.is_file():
        sd = torch.load(binf, map_location="cpu", weights_only=True, mmap=True)
        return {k: tuple(v.shape) for k, v in sd.items()}
    raise UsageError(f"adapter {d} has no adapter_model.safetensors")


def check_adapter_fits(adapter_dir: Union[str, Path], base_model: torch.nn.Module, base_name: str = "") -> None:
    """UsageError unless every LoRA matrix in `adapter_dir` matches a layer of `base_model` in shape."""
    recorded = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    modules = dict(base_model.named_modules())
    where = f"adapter {adapter_dir} (trained on '{recorded}') does not fit base '{base_name or recorded}'"
    for key, shape in adapter_shapes(adapter_dir).items():
        for part, dim in ((".lora_A.", 1), (".lora_B.", 0)):
            if part not in key:
                continue
            mod_name = key.split(part)[0]
            mod_name = mod_name[len("base_model.model."):] if mod_name.startswith("base_model.model.") else mod_name
            # peft nests one wrapper per target_parameters entry on the same module (MoE experts'
            # gate_up_proj and down_proj): the inner one's keys carry `.base_layer` infixes
            while mod_name.endswith(".base_layer"):
                mod_name = mod_name[: -len(".base_layer")]
            mod = modules.get(mod_name)
            if mod is None:
                raise UsageError(f"{where}: it adapts {mod_name}, which the base does not have")
            want = getattr(mod, "in_features" if dim == 1 else "out_features", None)
            if want is not None and len(shape) == 2 and shape[dim] != want:
                side = "input" if dim == 1 else "output"
                raise UsageError(f"{where}: {mod_name} has {side} size {want} in the base, {shape[dim]} in the adapter")


def _same_model(resolved: str, name: str) -> bool:
    """Whether `name` (a recorded base: hub id, alias or path) resolves to `resolved`."""
    try:
        return os.path.realpath(resolve_model_path(name)) == os.path.realpath(resolved)
    except UsageError:
        return False


def adapter_base_path(adapter_dir: str) -> str:
    """The base model an adapter records (base_model_name_or_path), resolved like any model name."""
    return resolve_model_path(read_adapter_config(adapter_dir)["base_model_name_or_path"])


def _is_adapter_dir(p: Path) -> bool:
    return (p / "adapter_config.json").is_file()


def load_for_inference(path: str, dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
                       base: Optional[str] = None, trust_remote_code: bool = False):
    """(model, tokenizer) in eval mode for an adapter dir, a merged/MoE model dir, an alias or a hub id.

    An adapter goes on the base named in its adapter_config.json (or `base`), after checking that
    it fits. The tokenizer is the adapter's own copy when it has one; it pads on the left, for
    batched generation.
    """
    device = torch.device(device)
    p = Path(str(path)).expanduser()
    if _is_adapter_dir(p):
        recorded = read_adapter_config(p).get("base_model_name_or_path")
        base_name = base or recorded
        if not base_name:
            raise UsageError(f"adapter {path} does not name its base model (base_model_name_or_path); pass base=...")
        try:
            base_path = resolve_model_path(base_name)
        except UsageError as e:
            raise UsageError(f"adapter {path}: its base model: {e}") from None
        if base and recorded and base != recorded and not _same_model(base_path, recorded):
            log.warning("adapter %s was trained on '%s'; loading it onto '%s'", path, recorded, base)
        model = load_pretrained(base_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        return attach_adapter(model, p, base_name, base_path, trust_remote_code=trust_remote_code)
    if p.is_dir() and not (p / "config.json").is_file():
        raise UsageError(f"{path} is neither a LoRA adapter (adapter_config.json) nor a model directory (config.json)")
    resolved = resolve_model_path(str(path))
    model = load_pretrained(resolved, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    tok = tokenizer_from(resolved, hub_kwargs(None, trust_remote_code), "left")
    sync_special_tokens(model, tok)
    return model.eval(), tok


def attach_adapter(model, adapter_dir: Union[str, Path], base_name: str, base_path: str,
                   trust_remote_code: bool = False, adapter_name: str = "default"):
    """(PeftModel in eval mode, tokenizer): the LoRA adapter at adapter_dir on `model`, after the fit check.

    `model` is the plain base, or a PeftModel from an earlier call on it: then the new adapter is
    loaded beside the old one, made the active one, and the old one deleted (peft's load_adapter,
    set_adapter, delete_adapter), so one loaded base serves adapter after adapter; each adapter
    needs its own `adapter_name`. The tokenizer is the adapter's own copy when it has one, padding
    on the left (batched generation).
    """
    p = Path(str(adapter_dir)).expanduser()
    swapping = isinstance(model, PeftModel)
    check_adapter_fits(p, model.get_base_model() if swapping else model, base_name)
    tok_src = str(p) if (p / "tokenizer_config.json").is_file() else base_path
    tok = tokenizer_from(tok_src, hub_kwargs(None, trust_remote_code), "left")
    sync_special_tokens(model, tok)
    with loading_errors(str(p)):
        if not swapping:
            return PeftModel.from_pretrained(model, str(p), adapter_name=adapter_name, is_trainable=False).eval(), tok
        old = list(model.peft_config)
        model.load_adapter(str(p), adapter_name=adapter_name, is_trainable=False)
    model.set_adapter(adapter_name)
    for name in old:
        model.delete_adapter(name)
    return model.eval(), tok


# What vLLM's LoRA loader refuses (vllm/lora/peft_helper.py: "vLLM does not yet support DoRA",
# "vLLM only supports modules_to_save being None", "Adapter bias is not supported"); it accepts
# classification heads as modules_to_save.
_VLLM_HEADS = ("classifier", "score")


def serving_note(adapter_dir: Union[str, Path]) -> Optional[str]:
    """One line when vLLM cannot serve the adapter at adapter_dir as a LoRA, else None."""
    try:
        cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    why = []
    if cfg.get("use_dora"):
        why.append("DoRA")
    extra = [m for m in cfg.get("modules_to_save") or [] if m not in _VLLM_HEADS]
    if extra:
        why.append(f"modules_to_save [{', '.join(extra)}]")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        why.append("a trained bias")
    if not why:
        return None
    return (f"note: vLLM cannot serve this adapter as a LoRA ({', '.join(why)}); merge it "
            f"(finetune merge adapter=DIR out_dir=...) and serve the merged model")


def add_serving_note(adapter_dir: Union[str, Path]) -> Optional[str]:
    """Append the serving note (if any) to the adapter's README.md, the model card a hub shows."""
    note = serving_note(adapter_dir)
    if note is not None:
        readme = Path(adapter_dir) / "README.md"
        text = readme.read_text() if readme.is_file() else ""
        readme.write_text(text.rstrip("\n") + ("\n\n" if text else "") + "## Serving\n\n" + note[len("note: "):] + "\n")
    return note
