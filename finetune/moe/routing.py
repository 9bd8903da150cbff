"""Router probabilities and the load-balancing loss, softmaxing exactly once.

transformers 5.3's `MixtralTopKRouter` returns softmax *probabilities* (recorded as
`router_logits`), and `load_balancing_loss_func` softmaxes them again (huggingface/transformers#45120),
which squashes P_e towards uniform. `load_balancing_loss` applies the softmax exactly once; router
training (recipes/moe-router.yaml) uses it and `router_trainable_params`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from finetune.errors import UsageError


def router_probs(router_outputs, inputs: str = "auto"):
    """Concatenate per-layer router outputs to (tokens * layers, E) probabilities, softmaxing once.

    inputs: "probs", "logits", or "auto" (rows that are non-negative and sum to 1 are taken as
    probabilities: transformers 5.3 Mixtral returns probabilities under the name router_logits).
    """
    t = router_outputs if isinstance(router_outputs, torch.Tensor) else \
        torch.cat([x.reshape(-1, x.shape[-1]).to(router_outputs[0].device) for x in router_outputs], dim=0)
    t = t.float()
    if inputs == "auto":
        inputs = "probs" if bool((t >= 0).all()) and torch.allclose(t.sum(-1), torch.ones(()), atol=1e-4) \
            else "logits"
    if inputs not in ("probs", "logits"):
        raise UsageError(f"inputs must be auto, probs or logits, got '{inputs}'")
    return t if inputs == "probs" else torch.softmax(t, dim=-1)


def load_balancing_loss(router_logits_per_layer: Sequence, num_experts: int, top_k: int,
                        attention_mask=None, inputs: str = "auto"):
    """Switch-Transformer auxiliary loss, num_experts * sum_e f_e * P_e, over all layers' tokens.

    f_e = fraction of tokens whose top-k contains expert e (the f's sum to top_k, the convention
    of Mixtral's own function), P_e = mean router probability of e. Probabilities are formed
    exactly once (see `router_probs`), so perfect balance gives top_k whatever `inputs` are.
    attention_mask (batch, seq) drops padding; each layer's output is then (batch * seq, E).
    """
    probs = router_probs(router_logits_per_layer, inputs)
    _, selected = torch.topk(probs, top_k, dim=-1)
    routed = torch.nn.functional.one_hot(selected, num_experts).float().sum(1)  # (T, E), 0/1 per expert
    if attention_mask is None:
        w = torch.ones(probs.shape[0], 1, device=probs.device)
    else:
        layers = probs.shape[0] // attention_mask.numel()
        w = attention_mask.reshape(1, -1).expand(layers, -1).reshape(-1, 1).to(probs.device, torch.float32)
    denom = w.sum().clamp(min=1.0)
    f = (routed * w).sum(0) / denom
    p = (probs * w).sum(0) / denom
    return num_experts * torch.sum(f * p)


def router_trainable_params(model) -> list[str]:
    """Names of the router weights (each MoE layer's `gate` linear) to train; works through peft."""
    names = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("TopKRouter") or (
                name.endswith(".gate") and type(module).__name__ == "Linear" and ".mlp" in name):
            names.append(f"{name}.weight")
    if not names:
        raise UsageError(f"{type(model).__name__} has no MoE router (mlp.gate) to train")
    return names
