"""NF4 storage for fused MoE expert weights, and LoRA on them through peft's target_parameters.

transformers 5.x keeps a Mixtral layer's experts as two 3-D parameters (`mlp.experts.gate_up_proj`
(E, 2I, H) and `mlp.experts.down_proj` (E, H, I)), not as nn.Linear modules, so bitsandbytes'
`load_in_4bit` leaves them in the compute dtype: 8 experts of a 1B model stay 13 GB in bf16. Here
each such parameter is stored as bitsandbytes NF4 (4-bit codes + one fp32 absmax per 64 values,
quantized by `bitsandbytes.functional.quantize_4bit`) through a torch parametrization: reading
`experts.gate_up_proj` dequantizes the stack to the compute dtype for that forward (and again when
gradient checkpointing recomputes it), so only one layer's stack is ever unpacked.

peft's `lora.ParamWrapper` adds its LoRA delta as a second parametrization on top and removes only
its own after each forward; for an already parametrized parameter peft matches `target_parameters`
by full name only, which `full_target_parameters` supplies from the short names in a recipe.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

NF4_BLOCK = 64
FUSED_EXPERT_PARAMS = ("gate_up_proj", "down_proj")


class NF4Stored(nn.Module):
    """Parametrization: the parameter lives as packed NF4 buffers; reading it dequantizes."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.state = None

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        import bitsandbytes.functional as F

        packed, self.state = F.quantize_4bit(w.detach(), quant_type="nf4", blocksize=NF4_BLOCK)
        self.register_buffer("packed", packed)
        # torch keeps `original` as a parameter of the same dtype; an empty one holds no memory
        return w.new_empty(0)

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        import bitsandbytes.functional as F

        return F.dequantize_4bit(self.packed, self.state).to(self.dtype)


def fused_expert_modules(model: nn.Module):
    """(name, module) of every module holding fused expert parameters (e.g. MixtralExperts)."""
    for name, m in model.named_modules():
        if type(m).__name__.endswith("Experts") and all(
                isinstance(getattr(m, p, None), torch.Tensor) for p in FUSED_EXPERT_PARAMS):
            yield name, m


def quantize_fused_experts(model: nn.Module, dtype: torch.dtype) -> int:
    """Store every fused expert weight of `model` as NF4 (in place, one stack at a time); returns
    how many were quantized (0 for a dense model)."""
    n = 0
    for _, m in list(fused_expert_modules(model)):
        for p in FUSED_EXPERT_PARAMS:
            if parametrize.is_parametrized(m, p):
                continue
            parametrize.register_parametrization(m, p, NF4Stored(dtype), unsafe=True)
            getattr(m.parametrizations, p).original.requires_grad_(False)
            n += 1
    return n


def full_target_parameters(model: nn.Module, names: list[str]) -> list[str]:
    """Recipe names of target parameters (e.g. mlp.experts.gate_up_proj) as peft needs them: full
    names for parametrized (NF4) experts, the names unchanged otherwise."""
    out = []
    for name in names:
        full = [f"{mname}.{name.rpartition('.')[2]}" for mname, m in fused_expert_modules(model)
                if parametrize.is_parametrized(m, name.rpartition(".")[2])
                and f"{mname}.{name.rpartition('.')[2]}".endswith(name)]
        out += full or [name]
    return out


def _remove_lora_proxy(wrapper) -> None:
    """Drop the LoRA parametrization a peft ParamWrapper added for one forward, keeping NF4Stored."""
    plist = wrapper.get_base_layer().parametrizations[wrapper.parameter_name]
    for i in reversed(range(len(plist))):
        if not isinstance(plist[i], NF4Stored):
            del plist[i]
            return


def keep_nf4_under_lora(model: nn.Module) -> None:
    """peft 0.21's ParamWrapper removes its per-forward proxy from a stacked parametrization only
    when it is a `_LoraParameterProxy`; with one adapter on a 3-D expert stack it registers a
    `_LoraFactorsProxy`, which then stayed and piled up (the delta added again on every forward)
    over NF4Stored. Each wrapper of an NF4 parameter gets a removal that drops the proxy."""
    import types

    for m in model.modules():
        if type(m).__name__ == "ParamWrapper":
            base = m.get_base_layer()
            if parametrize.is_parametrized(base, m.parameter_name) and any(
                    isinstance(p, NF4Stored) for p in base.parametrizations[m.parameter_name]):
                m._remove_parametrizations = types.MethodType(_remove_lora_proxy, m)
