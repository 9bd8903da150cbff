"""Tensor-at-a-time reading and writing for the MoE build: nothing holds a whole model.

* `ModelTensors` reads one tensor of a safetensors checkpoint (single file or sharded with an
  index) through `safe_open`, opening the file per read so its memory map is released at once:
  mapped pages the build has read would otherwise count as resident until the end.
* `AdapterDeltas` holds one LoRA adapter's (small) factors and gives the fp32 delta of a layer's
  MLP projection with peft's own merge arithmetic (`transpose(B @ A, fan_in_fan_out) * scaling`,
  scaling = alpha / r, or alpha / sqrt(r) with rslora, per-module rank/alpha patterns honoured), so
  `base + delta` is bit-identical to `merge_and_unload` on an fp32 base.
* `ShardWriter` writes safetensors shards whose layout (which key goes to which file, the file
  names, the index) is planned up front with huggingface_hub's shard splitter, the way
  `save_pretrained` plans it. safetensors can only serialise a complete dict, so the writer puts
  the header (every key's dtype, shape and offsets) first and then writes each tensor's bytes at its
  offset as it is produced: a shard is never held in memory, and tensors may come in any order.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch
from huggingface_hub import split_state_dict_into_shards_factory
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import load_file

from finetune.errors import FinetuneError, UsageError

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class ModelTensors:
    """Lazy access to the tensors of one checkpoint directory, by name."""

    def __init__(self, path: str, what: str):
        root = Path(path)
        index = root / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: root / f for k, f in weight_map.items()}
        elif (root / "model.safetensors").is_file():
            with safe_open(root / "model.safetensors", "pt") as f:
                self.files = {k: root / "model.safetensors" for k in f.keys()}
        else:
            raise UsageError(f"{what}: {path} has no safetensors weights (model.safetensors or its index); "
                             "convert it with save_pretrained(safe_serialization=True)")
        self.what = what

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def dtype(self, key: str) -> torch.dtype:
        """A tensor's stored dtype, read from the header only."""
        with safe_open(self.files[key], "pt") as f:
            code = f.get_slice(key).get_dtype()
        return {v: k for k, v in SAFETENSORS_DTYPES.items()}.get(code, torch.float32)

    def get(self, key: str) -> torch.Tensor:
        if key not in self.files:
            raise FinetuneError(f"{self.what}: tensor {key} missing from its checkpoint")
        with safe_open(self.files[key], "pt") as f:
            return f.get_tensor(key)


class AdapterDeltas:
    """One LoRA adapter's MLP deltas, one projection at a time (see module docstring)."""

    _KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")

    def __init__(self, adapter_dir: str, config: dict, mlp_parts: tuple[str, ...]):
        if config.get("peft_type", "LORA") != "LORA":
            raise UsageError(f"adapter {adapter_dir} is a {config['peft_type']} adapter; a MoE expert needs LoRA")
        for flag in ("use_dora", "lora_bias"):
            if config.get(flag):
                raise UsageError(f"adapter {adapter_dir} uses {flag}, which the MoE build cannot merge; "
                                 "merge it into a full model first (finetune merge) and use source_model")
        self.config = config
        path = Path(adapter_dir) / "adapter_model.safetensors"
        if not path.is_file():
            raise UsageError(f"adapter {adapter_dir} has no adapter_model.safetensors")
        self.factors: dict[str, dict[str, torch.Tensor]] = {}
        others = set()
        for key, t in load_file(path).items():
            m = self._KEY.match(key)
            if not m:
                continue
            module, kind = m.groups()
            if module.rsplit(".", 1)[-1] in mlp_parts and kind in ("lora_A", "lora_B"):
                self.factors.setdefault(module, {})[kind] = t
            else:
                others.add(module.rsplit(".", 1)[-1])
        self.dropped = sorted(others | {f"{n} (modules_to_save)" for n in (config.get("modules_to_save") or [])})

    def _scaling(self, module: str) -> float:
        c = self.config
        r = c.get("rank_pattern", {}).get(get_pattern_key(list(c.get("rank_pattern") or {}), module), c["r"])
        alpha = c.get("alpha_pattern", {}).get(get_pattern_key(list(c.get("alpha_pattern") or {}), module),
                                               c["lora_alpha"])
        return alpha / r ** 0.5 if c.get("use_rslora") else alpha / r

    def delta(self, module: str):
        """fp32 delta of `module` (e.g. model.layers.3.mlp.up_proj), or None when not adapted."""
        f = self.factors.get(module)
        if not f:
            return None
        out = f["lora_B"].float() @ f["lora_A"].float()
        if self.config.get("fan_in_fan_out"):
            out = out.T
        return out * self._scaling(module)


class ShardWriter:
    """Write the tensors of `layout` (key -> meta tensor) into planned shards, in any order."""

    def __init__(self, out_dir: Path, layout: dict[str, torch.Tensor], max_shard_size):
        self.out_dir, self.layout = Path(out_dir), layout
        split = split_state_dict_into_shards_factory(
            layout, get_storage_size=lambda t: t.numel() * t.element_size(),
            filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
        self.split = split
        self.where: dict[str, tuple[Path, int]] = {}
        for fname, keys in split.filename_to_tensors.items():
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for k in keys:
                t = layout[k]
                n = t.numel() * t.element_size()
                header[k] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                             "data_offsets": [offset, offset + n]}
                offset += n
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
            path = self.out_dir / fname
            with open(path, "wb") as f:
                f.write(struct.pack("<Q", len(raw)) + raw)
                f.truncate(8 + len(raw) + offset)
            for k in keys:
                self.where[k] = (path, 8 + len(raw) + header[k]["data_offsets"][0])
        self.pending = set(layout)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        want = self.layout[key]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise FinetuneError(f"MoE build: {key} is {tuple(tensor.shape)} {tensor.dtype}, "
                                f"expected {tuple(want.shape)} {want.dtype}")
        path, offset = self.where[key]
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(memoryview(data))
        self.pending.discard(key)

    def finish(self) -> None:
        """Check that every tensor was written and write the index (sharded outputs only)."""
        if self.pending:
            raise FinetuneError(f"MoE build: {len(self.pending)} tensors never written, e.g. {sorted(self.pending)[0]}")
        if self.split.is_sharded:
            index = {"metadata": {"total_parameters": sum(t.numel() for t in self.layout.values()),
                                  **self.split.metadata},
                     "weight_map": self.split.tensor_to_filename}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
