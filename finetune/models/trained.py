"""An adapter as it was trained: the run's saved config (config.yaml beside the adapter) and the
adapter loaded on its base quantized the way training quantized it (NF4 or int8), for `finetune
chat` and the fidelity report of merge/export. Also the base a QLoRA adapter was trained against:
the NF4 weights dequantized to full precision (what `finetune merge base_weights=dequantized`
merges into).

Loading itself is finetune.models.load's and finetune.models.adapters'; this module only decides
which base (quantized or not) an adapter belongs on."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

import torch
import yaml

from finetune.config import Config
from finetune.errors import UsageError
from finetune.models.adapters import attach_adapter, load_for_inference, read_adapter_config
from finetune.models.dtypes import no_cpu_repack as same_kernel_as_training
from finetune.models.load import bnb_config, load_full_precision, load_pretrained, resolve_model_path
from finetune.typed import instantiate, read_mapping

log = logging.getLogger(__name__)


def run_config(adapter_dir: Union[str, Path, None]) -> Optional[Config]:
    """The Config of the run that wrote `adapter_dir` (its config.yaml), None when it has none or
    it no longer parses (an adapter from elsewhere, or from an older finetune)."""
    if not adapter_dir:
        return None
    f = Path(str(adapter_dir)).expanduser() / "config.yaml"
    if not f.is_file():
        return None
    try:
        data = yaml.safe_load(f.read_text(encoding="utf-8"))
        return instantiate(Config, read_mapping(Config, data, str(f)))
    except Exception as e:  # noqa: BLE001 - a foreign or outdated config only costs its settings
        log.warning("cannot read the run config %s (%s); using defaults", f, str(e).splitlines()[0][:120])
        return None


def trained_quant(adapter_dir: Union[str, Path]) -> str:
    """none, nf4 or int8: how the base was quantized when the adapter was trained."""
    cfg = run_config(adapter_dir)
    return cfg.quant.mode if cfg is not None else "none"


def is_adapter(path: Union[str, Path]) -> bool:
    return (Path(str(path)).expanduser() / "adapter_config.json").is_file()


def load_as_trained(path: str, device: Union[str, torch.device], dtype: torch.dtype, base: Optional[str] = None):
    """(model in eval mode, tokenizer padding left) for an adapter on its base quantized as in
    training (NF4/int8 layers computing in `dtype`), or for a merged/MoE model dir, alias or hub id
    as it is stored (in `dtype`)."""
    device = torch.device(device)
    if not is_adapter(path):
        return load_for_inference(path, dtype=dtype, device=device)
    cfg = run_config(path)
    if cfg is None or cfg.quant.mode == "none":
        return load_for_inference(path, dtype=dtype, device=device, base=base)
    base_name = base or read_adapter_config(path)["base_model_name_or_path"]
    base_path = resolve_model_path(base_name)
    quant = bnb_config(cfg.quant, device, compute=dtype)
    # fused MoE experts are no Linear: load_pretrained NF4s them as training did
    model = load_pretrained(base_path, dtype=dtype, device=device, quant=quant, nf4_experts=cfg.quant.mode == "nf4")
    # Training never lets bitsandbytes repack 4-bit weights for its AVX512-BF16 CPU kernel (see
    # finetune.models.dtypes.no_cpu_repack); that kernel's rounding differs, so "as trained" computes without it too
    # (SmolLM2-135M: a dequantized merge agreed 94.7% with the repacked kernel, 100.0% without).
    same_kernel_as_training(model)
    return attach_adapter(model, path, base_name, base_path)


def dequantized_base(adapter_dir: str, base_path: str) -> torch.nn.Module:
    """The base in fp32 on CPU with every layer that training stored in NF4 replaced by its NF4
    weights dequantized: the weights the QLoRA adapter's delta was learned against."""
    cfg = run_config(adapter_dir)
    if cfg is None or cfg.quant.mode != "nf4":
        mode = "no recorded run config" if cfg is None else f"quant.mode={cfg.quant.mode}"
        raise UsageError(f"base_weights=dequantized applies to adapters trained on an NF4 base; {adapter_dir} "
                         f"has {mode}; use base_weights=original")
    import bitsandbytes as bnb

    base = load_full_precision(base_path)
    quant = bnb_config(cfg.quant, "cpu", compute=torch.float32)
    nf4 = load_pretrained(base_path, dtype=torch.float32, device=torch.device("cpu"), quant=quant)
    n = 0
    with torch.no_grad():
        for name, m in nf4.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
                base.get_submodule(name).weight.copy_(w.reshape(base.get_submodule(name).weight.shape))
                n += 1
    log.info("base_weights=dequantized: %d layers replaced by their NF4 weights", n)
    del nf4
    return base
