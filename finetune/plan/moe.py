"""What a Mixtral-shaped model adds to the dense prediction (finetune.plan.predict).

The dense arithmetic already counts the experts as E copies of each MLP linear (stored as NF4
under quant.mode=nf4: finetune.models.experts quantizes the fused expert stacks with the same
4-bit layout as bitsandbytes' Linear4bit), top-k MLP activations per token and the router logits.
What only a MoE has, counted here:

* expert LoRA through `lora.target_parameters` (peft's ParamWrapper on the fused
  `mlp.experts.gate_up_proj` (E, 2I, H) / `mlp.experts.down_proj` (E, H, I)): per layer and stack
  lora_A (E*r, in) and lora_B (out, E*r) in fp32, their grads and optimizer state;
* routers trained in full (`lora.modules_to_save: [gate]`): E x H per layer, fp32, grads, state;
* the unpacked expert stacks. A layer's forward reads each stack in the compute dtype (NF4
  dequantized, plus the LoRA delta folded in by one baddbmm), and the grouped expert matmuls keep
  that tensor for backward: every layer's stacks without gradient checkpointing, the recomputed
  layer's with it. The backward of a LoRA'd stack forms its gradient, one more stack-sized tensor.
  Plain (unquantized, no expert LoRA) experts are the parameters themselves: nothing extra.

Planning a MoE before it is built: model.name `8xmeta-llama/Llama-3.2-1B` (E x a base the
planner knows) is that base's shape with E experts and top-2 routing (`finetune moe`'s default).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional

_MOE_NAME = re.compile(r"^(\d+)x(.+)$")
STACKS = {"gate_up_proj": "gate_up", "w13": "gate_up", "down_proj": "down", "w2": "down"}


def planned_moe(name: str, base_shape: Callable) -> Optional[object]:
    """Shape of a MoE named `{E}x{base}` (see module docstring), or None for any other name."""
    m = _MOE_NAME.match(name)
    if not m or int(m.group(1)) < 2:
        return None
    base = base_shape(m.group(2))
    return dataclasses.replace(base, name=name, n_expert=int(m.group(1)), expert_top_k=2)


def expert_lora_stacks(cfg) -> set[str]:
    """Which fused expert stacks `lora.target_parameters` adapts: gate_up and/or down."""
    return {STACKS[t.rsplit(".", 1)[-1]] for t in (cfg.lora.target_parameters or [])
            if t.rsplit(".", 1)[-1] in STACKS}


def moe_parts(cfg, s, c: int, opt_bytes: Callable[[int, str], int]) -> dict[str, int]:
    """Bytes a Mixtral-shaped `s` adds to the dense plan's parts (c = compute-dtype bytes)."""
    E, H, I, L, r = s.n_expert, s.hidden, s.intermediate, s.n_layer, cfg.lora.r
    stacks = {"gate_up": ((2 if s.gated_mlp else 1) * I, H), "down": (H, I)}  # (out, in) per expert
    targets = expert_lora_stacks(cfg)
    trainable = []
    for name in sorted(targets):
        out_f, in_f = stacks[name]
        trainable += [E * r * in_f, out_f * E * r] * L
    if "gate" in cfg.lora.modules_to_save:
        trainable += [E * H] * L
    n = sum(trainable)
    stack_bytes = {k: c * E * o * i for k, (o, i) in stacks.items()}
    unpacked = cfg.quant.mode != "none" or targets
    kept = sum(stack_bytes.values()) if unpacked else 0
    kept *= 1 if cfg.train.gradient_checkpointing else L
    grad_stack = max((stack_bytes[t] for t in targets), default=0)
    return {"lora_params": 4 * n, "lora_grads": 4 * n,
            "optimizer_state": sum(opt_bytes(t, cfg.train.optimizer) for t in trainable),
            "expert_stacks": kept + grad_stack}
