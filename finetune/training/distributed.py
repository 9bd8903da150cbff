"""Fabric strategies and the state that has to be gathered across ranks to be saved.

DDP replicates the model: rank 0 holds every LoRA weight and optimizer state and saves them
alone. FSDP shards them: each rank holds a slice of every flat parameter (LoRA, norms and the
4-bit weights, which `quant.storage_dtype` stores in the compute dtype so they can be flattened
together), so saving is a collective: every rank enters the gather, rank 0 receives the full
tensors and writes the checkpoint. The checkpoint is the same PEFT adapter dir as without FSDP,
and its optimizer state is keyed by parameter name, so it resumes on any number of devices.

FSDP here is torch's FullyShardedDataParallel (FULL_SHARD, use_orig_params, one unit per decoder
layer) through Lightning Fabric's FSDPStrategy. Fabric only offers it on GPUs; torch's FSDP
itself runs on CPU with gloo, which is how the test suite exercises this file without a GPU.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Optional

import torch
from lightning.fabric.plugins.precision.fsdp import FSDPPrecision
from lightning.fabric.strategies import DDPStrategy, FSDPStrategy
from peft import get_peft_model_state_dict
from torch import nn
from torch.distributed.fsdp import (
    FullOptimStateDictConfig,
    FullStateDictConfig,
    FullyShardedDataParallel,
    MixedPrecision,
    ShardingStrategy,
    StateDictType,
)
from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

from finetune.config import Config
from finetune.errors import FinetuneError, UsageError
from finetune.runtime import compile_layers, default_device, fsdp_param_dtype


def make_strategy(cfg: Config, accelerator: str, precision: str = "32-true"):
    """The Fabric strategy for cfg.strategy (a name Fabric resolves itself where no setting is ours).
    `precision` is the Fabric precision finetune.runtime.resolve_precision chose; under FSDP it
    only decides autocast, the dtypes are finetune.runtime.fsdp_param_dtype's (PolicyPrecision)."""
    if cfg.strategy == "fsdp":
        if cfg.devices * cfg.num_nodes < 2:
            raise UsageError("strategy=fsdp shards over processes and needs devices x num_nodes >= 2; "
                             "on one device use strategy=auto")
        if cfg.train.optimizer != "adamw":
            # bitsandbytes' optimizer state is not shaped like FSDP's parameter shards (8-bit state
            # is block-quantized), so torch's FSDP cannot gather it into a checkpoint (measured:
            # "size of tensor a (320) must match ... (192)" at the first save).
            raise UsageError(f"strategy=fsdp needs train.optimizer=adamw (got {cfg.train.optimizer}): FSDP cannot "
                             "gather bitsandbytes optimizer state into a checkpoint; LoRA's AdamW state is small")
        if cfg.quant.mode == "int8":
            raise UsageError("strategy=fsdp cannot shard int8 weights (FSDP flattens only float tensors); "
                             "use quant.mode=nf4 or strategy=ddp")
        if cfg.quant.mode == "nf4" and cfg.quant.storage_dtype == "uint8":
            raise UsageError("strategy=fsdp needs quant.storage_dtype=auto or a float dtype (got uint8): "
                             "FSDP flattens the packed 4-bit weights together with float parameters")
        if precision not in PolicyPrecision.SUPPORTED:
            raise UsageError(f"strategy=fsdp supports precision {', '.join(PolicyPrecision.SUPPORTED)} "
                             f"(got {precision})")
        if accelerator == "cpu" and compile_layers(cfg.train.compile, "cpu"):
            # measured (torch 2.13, 2 gloo processes, tiny-lora): inductor's C++ build of the
            # layers under FSDP's flat parameters fails at the first step ("CppCompileError").
            raise UsageError("strategy=fsdp with train.compile=layers fails on a CPU (inductor cannot build the "
                             "FSDP-wrapped layers); set train.compile=off")
        dtype = fsdp_param_dtype(cfg, default_device(accelerator))
        return FSDPOnAnyDevice(auto_wrap_policy=decoder_layer_policy(), sharding_strategy=ShardingStrategy.FULL_SHARD,
                               state_dict_type="full", use_orig_params=True, cpu_offload=False,
                               limit_all_gathers=True, process_group_backend="gloo" if accelerator == "cpu" else None,
                               precision=PolicyPrecision(precision, dtype))
    if cfg.strategy == "ddp" and accelerator == "cpu":
        return DDPStrategy(process_group_backend="gloo")
    return cfg.strategy


def decoder_layer_policy():
    """Wrap each decoder layer, so FSDP shards per block (LoRA and 4-bit weights alike)."""
    def is_block(module: nn.Module) -> bool:
        return type(module).__name__.endswith("DecoderLayer")

    return partial(lambda_auto_wrap_policy, lambda_fn=is_block)


class PolicyPrecision(FSDPPrecision):
    """Fabric's FSDP precision plugin with finetune.runtime's dtypes: FSDP's MixedPrecision is
    `param_dtype` for parameters and gradient reduction (buffers keep theirs, e.g. RoPE's fp32
    inverse frequencies), and the module is never cast, because load_model already put every
    float parameter, the packed 4-bit bytes included, in that dtype. The precision string keeps
    deciding autocast (bf16-mixed / 16-mixed on a GPU) and the gradient scaler (16-mixed).

    Fabric's FSDPPrecision derives both from the string instead: `32-true` gathers the flat
    parameters as fp32 and casts the module to fp32, which turned the bf16-stored NF4 bytes into
    numbers (the crash at precision=auto on a bf16 CPU). Here a mismatch is impossible by
    construction, and convert_module checks it anyway (an internal error, before any step)."""

    SUPPORTED = ("32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed")

    def __init__(self, precision: str, param_dtype: torch.dtype):
        super().__init__(precision)
        self.param_dtype = param_dtype

    def convert_module(self, module: nn.Module) -> nn.Module:
        odd = sorted({str(p.dtype) for p in module.parameters() if p.is_floating_point() and p.dtype != self.param_dtype})
        if odd:
            raise FinetuneError(f"FSDP: parameters in {', '.join(odd)}, the dtype policy says {self.param_dtype} "
                                "(finetune.runtime.fsdp_param_dtype)")
        return module

    @property
    def mixed_precision_config(self) -> MixedPrecision:
        return MixedPrecision(param_dtype=self.param_dtype, reduce_dtype=self.param_dtype, buffer_dtype=None)


class FSDPOnAnyDevice(FSDPStrategy):
    """Fabric's FSDPStrategy, also on CPU (gloo). Fabric passes `device_id=device.index`, which is
    None on CPU, and torch's FSDP then looks for an accelerator; naming the CPU device avoids that.
    (Fabric refuses the stock class on CPU before it gets this far; a subclass passes its check.)"""

    def setup_module(self, module: nn.Module) -> nn.Module:
        if self.root_device.type != "cpu":
            return super().setup_module(module)
        return FullyShardedDataParallel(module=module, cpu_offload=self.cpu_offload,
                                        mixed_precision=self.mixed_precision_config,
                                        sharding_strategy=self.sharding_strategy,
                                        device_id=torch.device("cpu"), **self._fsdp_kwargs)


# --------------------------------------------------------------------------- gathering for a checkpoint


def fsdp_root(module: nn.Module) -> Optional[nn.Module]:
    """The outermost FullyShardedDataParallel inside a Fabric-wrapped module, or None without FSDP."""
    inner = getattr(module, "_forward_module", module)
    return inner if isinstance(inner, FullyShardedDataParallel) else None


def param_bytes(module: nn.Module) -> int:
    """Bytes of the parameters this process holds (under FSDP: its shards; 4-bit weights as packed)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


@contextmanager
def _full_state(root: nn.Module):
    """FSDP's full (unsharded) state-dict mode, received by rank 0 alone. Each unit is gathered
    in turn, so no rank ever holds the whole model unsharded; on GPU the gathered tensors go
    straight to CPU RAM (offloading is GPU-only in torch's FSDP)."""
    offload = next(root.parameters()).device.type != "cpu"
    with FullyShardedDataParallel.state_dict_type(
            root, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=offload, rank0_only=True),
            FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=True)):
        yield


class CheckpointState:
    """The checkpoint's view of a model and optimizer that FSDP may shard.

    Built before Fabric wraps the model: peft picks the adapter's tensors by module path and
    FSDP's wrappers change those paths (`..._fsdp_wrapped_module...`), so names are taken while
    the tree is plain. FSDP (use_orig_params) keeps the same Parameter objects, so the names
    still find them after wrapping. Optimizer state is saved as the optimizer keeps it: by
    position without FSDP, by parameter name under FSDP (what torch's FSDP gathers); loading
    converts between the two, so a run resumes under either strategy and any device count.
    """

    def __init__(self, lossmod: nn.Module, peft_model: nn.Module, optimizer):
        name_of = {id(p): n for n, p in lossmod.named_parameters()}
        params = peft_model.state_dict(keep_vars=True)  # the Parameter objects, not copies
        tensor_name = {id(v): k for k, v in params.items()}
        saved = get_peft_model_state_dict(peft_model, state_dict=params)
        # lossmod (the objective's loss module) holds the PeftModel as `model`: its names are
        # "model." + the PeftModel's.
        self.adapter_names = {saved_key: "model." + tensor_name[id(v)] for saved_key, v in saved.items()}
        self.groups = [[name_of[id(p)] for p in g["params"]] for g in optimizer.param_groups]

    def adapter_weights(self, lossmod: nn.Module) -> Optional[dict]:
        """Called on every rank under FSDP: {saved name: tensor} on rank 0, {} on the others.
        None without FSDP (peft's save_pretrained reads the model itself)."""
        root = fsdp_root(lossmod)
        if root is None:
            return None
        with _full_state(root):
            full = root.state_dict()  # on ranks > 0 only what bitsandbytes adds for its 4-bit weights
        if torch.distributed.get_rank() != 0:
            return {}
        # fp32 on disk as without FSDP: under a half FSDP dtype the LoRA weights train in it
        # (finetune.runtime.fsdp_param_dtype), and widening them loses nothing.
        return {k: full[name].to(torch.float32, copy=True) for k, name in self.adapter_names.items()}

    def optimizer_state(self, lossmod: nn.Module, optimizer) -> dict:
        """The optimizer's state dict to save (called on every rank; under FSDP complete on rank 0)."""
        root = fsdp_root(lossmod)
        optimizer = getattr(optimizer, "optimizer", optimizer)  # Fabric's wrapper
        if root is None:
            return optimizer.state_dict()
        with _full_state(root):
            return FullyShardedDataParallel.optim_state_dict(root, optimizer)

    def load_optimizer_state(self, lossmod: nn.Module, optimizer, saved: dict) -> None:
        """Load a saved optimizer state on every rank (each reads the same file; FSDP keeps its shard)."""
        root = fsdp_root(lossmod)
        optimizer = getattr(optimizer, "optimizer", optimizer)
        by_name = _keyed_by_name(saved)
        if root is None:
            optimizer.load_state_dict(self._by_position(saved) if by_name else saved)
            return
        saved = saved if by_name else self._by_name(saved)
        with _full_state(root):
            optimizer.load_state_dict(FullyShardedDataParallel.optim_state_dict_to_load(root, optimizer, saved))

    def _by_name(self, saved: dict) -> dict:
        """Position-keyed (torch's own format) -> name-keyed (FSDP's)."""
        order = [n for g in self.groups for n in g]
        groups = [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]
        return {"state": {order[i]: v for i, v in saved["state"].items()}, "param_groups": groups}

    def _by_position(self, saved: dict) -> dict:
        """Name-keyed -> position-keyed, positions in this optimizer's own order (torch matches
        saved and current parameters by position)."""
        if len(saved["param_groups"]) != len(self.groups):
            raise UsageError(f"checkpoint optimizer has {len(saved['param_groups'])} parameter group(s), "
                             f"this run has {len(self.groups)}")
        position = {n: i for i, n in enumerate(n for g in self.groups for n in g)}
        mismatched = sorted(set(n for g in saved["param_groups"] for n in g["params"]) ^ set(position))
        if mismatched:
            raise UsageError(f"checkpoint optimizer state does not fit this model: e.g. {mismatched[0]}")
        groups = [{**sg, "params": [position[n] for n in mine]} for sg, mine in zip(saved["param_groups"], self.groups)]
        return {"state": {position[n]: v for n, v in saved["state"].items()}, "param_groups": groups}


def _keyed_by_name(optim_state: dict) -> bool:
    return any(isinstance(p, str) for g in optim_state.get("param_groups", []) for p in g.get("params", []))
