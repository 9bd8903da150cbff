"""The trained model's dtypes, as finetune.runtime's policy decides them: frozen weights kept in
the policy's dtype (no fp32 round trip through peft's k-bit preparation), trained weights in fp32
(their small updates vanish in bf16) computing beside half-precision neighbours, one float dtype
for FSDP's flat parameters, and bitsandbytes' 4-bit layout kept as trained. finetune.models.load
applies them while it builds the model to train.
"""

from __future__ import annotations

import types
from typing import Optional

import torch
from peft import prepare_model_for_kbit_training


def _packed(p: torch.Tensor) -> bool:
    # bitsandbytes' packed 4-bit weights (stored in the quant storage dtype, possibly a float one)
    # are never cast. By class name: importing bitsandbytes here would load it for every model.
    return type(p).__name__ == "Params4bit"


def prepare_kbit(model, dtypes: dict, gradient_checkpointing: bool, checkpoint_kwargs: dict):
    """peft's prepare_model_for_kbit_training where the dtype policy is its own (fp32 frozen
    weights: a compute dtype of fp32); else what it does (freeze every weight, non-reentrant
    gradient checkpointing, which needs no input-grad hook) without its upcast of every frozen
    half weight to fp32, which kbit_frozen_dtypes would cast straight back: on a GPU that round
    trip holds the embeddings and head in fp32 at once (Llama-3.1-8B: about +4 GB at load)."""
    if all(d is None for d in dtypes.values()):
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                               gradient_checkpointing_kwargs=checkpoint_kwargs)
    for p in model.parameters():
        p.requires_grad = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
    # None = peft's fp32 (the fp16 norms): cast here, as peft would have
    frozen_dtypes(model, {k: d or torch.float32 for k, d in dtypes.items()})
    return model


def frozen_dtypes(model: torch.nn.Module, dtypes: dict) -> None:
    """Undo prepare_model_for_kbit_training's fp32 upcast of the frozen, unquantized weights as
    finetune.runtime.kbit_frozen_dtypes decides (norms: any module whose class name has 'Norm')."""
    for module in model.modules():
        kind = "norms" if "Norm" in type(module).__name__ else "embeddings"
        dtype = dtypes[kind]
        for p in module.parameters(recurse=False):
            if dtype is not None and p.is_floating_point() and not _packed(p) \
                    and not p.requires_grad and p.dtype != dtype:
                p.data = p.data.to(dtype)


def trained_in_fp32(model: torch.nn.Module, compute: Optional[torch.dtype] = None) -> None:
    """Trained parameters in fp32 (peft does it for LoRA weights, not for modules_to_save copies of a
    half-precision base): their updates are small against the weights, and bf16 rounds them away.

    `compute` (finetune.runtime.lora_compute_dtype) is the dtype the trained modules compute in:
    each LoRA branch's lora_A and lora_B, and each modules_to_save copy (a MoE router, a head), run
    under autocast to it, which casts the fp32 weights per forward (gradients reach them in fp32)
    and leaves what the module does in fp32 itself (a router's softmax) as it is; peft's upcast of
    the branch input is switched off (its documented cast_input_dtype_enabled), so no fp32 copy of
    the input exists. DoRA layers keep peft's own dtypes (their weight norm mixes base and LoRA).

    None: fp32 compute. A copy made fp32 then meets its neighbours' half-precision activations.
    Under GPU autocast that is fine; on CPU (Fabric's 32-true over bf16 frozen weights) a MoE
    router's linear failed with "BFloat16 != float". So the copy computes in fp32 on inputs cast up,
    as peft's LoRA branch does. Either way a copy hands its neighbours their own dtype back."""
    for module in model.modules():
        copies = getattr(module, "modules_to_save", None)
        if not isinstance(copies, torch.nn.ModuleDict):
            continue
        for copy in copies.values():
            half = {p.dtype for p in copy.parameters() if p.is_floating_point() and p.dtype != torch.float32}
            if compute is not None:
                _compute_in(copy, compute)
                copy.register_forward_pre_hook(_record_input_dtype)
                copy.register_forward_hook(_outputs_to_input_dtype, with_kwargs=True)
            elif half:
                copy.register_forward_pre_hook(_inputs_to_fp32)
                copy.register_forward_hook(_outputs_to_input_dtype, with_kwargs=True)
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    if compute is not None:
        for module in model.modules():
            if _lora_branch_layer(module):
                module.cast_input_dtype_enabled = False
                module._finetune_compute_dtype = compute
                _branches_in_compute_dtype(module, ())
                # an adapter loaded later (a preference run's frozen reference) computes alike
                module.register_forward_pre_hook(_branches_in_compute_dtype)


def _lora_branch_layer(module) -> bool:
    """A peft LoRA layer whose branch computes lora_B(lora_A(dropout(x))) on its input x (Linear,
    bitsandbytes' 4/8-bit Linear); not a ParamWrapper (target_parameters: a weight delta, no input
    of its own) and not DoRA (a variant with its own dtype handling)."""
    return (hasattr(module, "cast_input_dtype_enabled") and isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict)
            and type(module).__name__ != "ParamWrapper" and not getattr(module, "lora_variant", None))


def _branches_in_compute_dtype(layer, args):
    for linear in (*layer.lora_A.values(), *layer.lora_B.values()):
        if "forward" not in vars(linear):
            _compute_in(linear, layer._finetune_compute_dtype)


def _compute_in(module: torch.nn.Module, dtype: torch.dtype) -> None:
    # A bound method on the instance: deepcopy rebinds it to the copy; the class stays what peft
    # and transformers check for.
    module._finetune_compute_dtype = dtype
    module.forward = types.MethodType(_autocast_forward, module)


def _autocast_forward(self, *args, **kwargs):
    device = next(self.parameters()).device.type
    with torch.autocast(device, dtype=self._finetune_compute_dtype):
        return type(self).forward(self, *args, **kwargs)


def _record_input_dtype(module, args):
    module._finetune_in_dtype = next((a.dtype for a in args if torch.is_tensor(a) and a.is_floating_point()), None)


def _inputs_to_fp32(module, args):
    _record_input_dtype(module, args)
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _outputs_to_input_dtype(module, args, kwargs, output):
    dtype = getattr(module, "_finetune_in_dtype", None)
    if dtype is None:
        return output
    cast = lambda t: t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t  # noqa: E731
    return tuple(cast(t) for t in output) if isinstance(output, tuple) else cast(output)


def no_cpu_repack(model: torch.nn.Module) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for its AVX512-BF16 CPU kernel.

    On such CPUs a Linear4bit in eval mode without grad (validation) rewrites its packed weight in
    place into another layout. Under FSDP that weight is a shard of a flat parameter stored in the
    compute dtype, and the inverse repack bitsandbytes runs on state_dict() asserts uint8, so the
    next checkpoint crashed. A training model keeps one layout; validation then also computes with
    the same kernel as training, on every CPU.
    """
    for m in model.modules():
        if getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False


def one_float_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast every float parameter but the packed 4-bit weights to `dtype`. peft keeps LoRA weights
    in fp32 and k-bit preparation upcasts norms to fp32; FSDP refuses a unit of mixed dtypes
    ("Must flatten tensors with uniform dtype"). Under bf16 this trains LoRA weights in bf16."""
    for p in model.parameters():
        if not _packed(p) and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
