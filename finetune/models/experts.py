"""NF4 storage for fused MoE expert weights, and LoRA on them through peft's target_parameters.

transformers 5.x keeps a Mixtral layer's experts as two 3-D parameters (`mlp.experts.gate_up_proj`
(E, 2I, H) and `mlp.experts.down_proj` (E, H, I)), not as nn.Linear modules, so bitsandbytes'
`load_in_4bit` leaves them in the compute dtype: 8 experts of a 1B model stay 13 GB in bf16. Here
each such parameter is stored as bitsandbytes NF4 (4-bit codes + one absmax per 64 values,
quantized by `bitsandbytes.functional.quantize_4bit`, double-quantized with quant.double_quant) through a torch parametrization: reading
`experts.gate_up_proj` dequantizes the stack to the compute dtype for that forward (and again when
gradient checkpointing recomputes it), so only one layer's stack is ever unpacked.

peft's `lora.ParamWrapper` adds its LoRA delta as a second parametrization on top and removes only
its own after each forward; for an already parametrized parameter peft matches `target_parameters`
by full name only, which `full_target_parameters` supplies from the short names in a recipe.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

NF4_BLOCK = 64
FUSED_EXPERT_PARAMS = ("gate_up_proj", "down_proj")


class NF4Stored(nn.Module):
    """Parametrization: the parameter lives as packed NF4 buffers; reading it dequantizes."""

    def __init__(self, dtype: torch.dtype, double_quant: bool = False):
        super().__init__()
        self.dtype, self.double_quant = dtype, double_quant
        self.state = None

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        import bitsandbytes.functional as F

        if self.state is None:  # re-registering (see unquantized_view) keeps the codes
            packed, self.state = F.quantize_4bit(w.detach(), quant_type="nf4", blocksize=NF4_BLOCK,
                                                  compress_statistics=self.double_quant)
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


def quantize_fused_experts(model: nn.Module, dtype: torch.dtype, double_quant: bool = False,
                           device: Optional[torch.device] = None) -> int:
    """Store every fused expert weight of `model` as NF4 (in place, one stack at a time; with
    double_quant the absmax are quantized too, as quant.double_quant does for Linear4bit); returns
    how many were quantized (0 for a dense model).

    With `device`, each stack still elsewhere (finetune.models.load leaves them on the CPU) moves
    there alone and is packed there, its CPU copy dropped first: the device holds one unpacked
    stack at a time, never all of them (8 x 1B in bf16: 12.9 GB)."""
    n = 0
    for _, m in list(fused_expert_modules(model)):
        for p in FUSED_EXPERT_PARAMS:
            if parametrize.is_parametrized(m, p):
                continue
            if device is not None:
                _stage(m, p, torch.device(device))
            parametrize.register_parametrization(m, p, NF4Stored(dtype, double_quant), unsafe=True)
            # the parametrization empties the staged parameter in place (torch's set_): the
            # unpacked stack is gone before the next one is staged
            getattr(m.parametrizations, p).original.requires_grad_(False)
            n += 1
    return n


def _stage(m: nn.Module, name: str, device: torch.device) -> None:
    """Replace the parameter `name` of `m` by its copy on `device` (the source copy is freed; on
    the same device the same tensor)."""
    setattr(m, name, nn.Parameter(getattr(m, name).detach().to(device), requires_grad=False))


@contextmanager
def unquantized_view(model: nn.Module):
    """While peft wraps the model: every NF4 expert parameter as a plain zero-size-stride stub of
    its real shape and dtype, then NF4Stored again underneath peft's wrappers.

    peft matches an already parametrized parameter by full name only and nests the wrappers of
    one module in another order than for a plain one (sorted names instead of definition order),
    which puts `base_layer` infixes into other keys: an adapter trained on NF4 experts would not
    load onto the plain MoE with PeftModel.from_pretrained. Wrapping the plain view gives the same
    nesting, names and keys as there."""
    held = []
    for _, m in list(fused_expert_modules(model)):
        for p in FUSED_EXPERT_PARAMS:
            if parametrize.is_parametrized(m, p):
                nf4 = m.parametrizations[p][0]
                parametrize.remove_parametrizations(m, p, leave_parametrized=False)
                stub = torch.zeros((), dtype=nf4.dtype, device=nf4.packed.device).expand(nf4.state.shape)
                setattr(m, p, nn.Parameter(stub, requires_grad=False))
                held.append((m, p, nf4))
    try:
        yield
    finally:
        for m, p, nf4 in held:
            parametrize.register_parametrization(m, p, nf4, unsafe=True)
            getattr(m.parametrizations, p).original.requires_grad_(False)


def _remove_lora_proxy(wrapper) -> None:
    """Drop the LoRA parametrization a peft ParamWrapper added for one forward, keeping NF4Stored."""
    plist = wrapper.get_base_layer().parametrizations[wrapper.parameter_name]
    for i in reversed(range(len(plist))):
        if not isinstance(plist[i], NF4Stored):
            del plist[i]
            return


def _nf4_param_stub(wrapper) -> torch.Tensor:
    """What peft reads of the wrapped parameter (dtype, device, shape), without dequantizing."""
    nf4 = wrapper.get_base_layer().parametrizations[wrapper.parameter_name][0]
    return torch.zeros((), dtype=nf4.dtype, device=nf4.packed.device).expand(nf4.state.shape)


def _activate_uncached(activate):
    @contextmanager
    def wrapped(self, active_adapters):
        with activate(self, active_adapters):
            # torch's parametrize cache is keyed by (id(module), name); see keep_nf4_under_lora
            parametrize._cache.pop((id(self.get_base_layer()), self.parameter_name), None)
            yield
    return wrapped


def keep_nf4_under_lora(model: nn.Module) -> None:
    """Two fixes for peft 0.21's ParamWrapper over an NF4Stored parameter:

    * it removes its per-forward proxy from a stacked parametrization only when that is a
      `_LoraParameterProxy`; with one adapter on a 3-D expert stack it registers a
      `_LoraFactorsProxy`, which stayed and piled up (the delta added again on every forward);
    * the inner of two nested wrappers (gate_up_proj's around down_proj's) registers its proxy
      inside the outer one's `parametrize.cached()` context, and registering on an already
      parametrized tensor evaluates it: the value without LoRA was cached and used, so down_proj's
      LoRA got no gradient. The stale cache entry is dropped right after the registration.
    Each wrapper of an NF4 parameter also reads a zero-size stub for the parameter's dtype, device
    and shape instead of dequantizing the stack for them.
    """
    import types

    for m in model.modules():
        if type(m).__name__ == "ParamWrapper":
            base = m.get_base_layer()
            if parametrize.is_parametrized(base, m.parameter_name) and any(
                    isinstance(p, NF4Stored) for p in base.parametrizations[m.parameter_name]):
                m._remove_parametrizations = types.MethodType(_remove_lora_proxy, m)
                m.get_param = types.MethodType(_nf4_param_stub, m)
                m._activate_lora = types.MethodType(_activate_uncached(type(m)._activate_lora), m)
