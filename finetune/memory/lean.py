"""Memory-lean autograd: the same math as the plain modules, with less kept for backward.

Training memory on a small model is mostly what autograd saves between forward and backward.
Two places save more than they need:

- the head + cross-entropy: `F.cross_entropy(head(h).float(), t)` keeps the log-probabilities
  (positions x vocab fp32) until backward, and backward then holds two more tensors that size.
  With a frozen head the only gradient wanted is the one wrt `h`, and it is known in forward
  (softmax - one-hot) @ W, so `linear_cross_entropy` computes it there, chunk by chunk, and keeps
  just that (positions x hidden) for backward: the logits never outlive a chunk.
- SwiGLU MLPs, `down(silu(gate(x)) * up(x))`: autograd keeps gate(x), up(x) *and* silu(gate(x));
  `silu_mul` keeps only the first two and recomputes the sigmoid in backward (a few elementwise
  ops, cheap next to the matmuls). `patch_swiglu` applies it to MLP modules whose forward is
  exactly that expression (checked on the source) with a SiLU activation; any other module keeps
  its own forward.

- SDPA attention on the CPU with a mask (packed sequences always have one): transformers then
  repeats k and v to every query head (`repeat_kv`) and torch turns the boolean mask into a float
  one in every layer, and autograd keeps all of those. `patch_attention` registers an attention
  function that passes k/v unrepeated (`enable_gqa`, which the CPU flash kernel supports with a
  mask) and converts the mask once per forward; anything else (GPU, no mask, a float mask) goes to
  transformers' own sdpa function unchanged.

All give the same loss and gradients as the plain path within floating-point rounding
(tests/memory/test_lean.py).
"""

from __future__ import annotations

import ast
import inspect
import logging
import textwrap
import types
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.activations import SiLUActivation
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- head + cross-entropy


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(F.linear(hidden, weight, bias).float(), targets), frozen weight/bias."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        need_grad = ctx.needs_input_grad[0]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_grad else None
        for i in range(0, hidden.shape[0], chunk):
            h, t = hidden[i:i + chunk], targets[i:i + chunk]
            logits = F.linear(h, weight, bias).float()  # a no-op .float() for an fp32 head
            picked = logits.gather(1, t[:, None])
            top = logits.amax(dim=-1, keepdim=True)
            p = logits.sub_(top).exp_()  # in the logits' own buffer: no second positions x vocab tensor
            total = p.sum(dim=-1, keepdim=True)
            loss += (top + total.log() - picked).sum()  # logsumexp - logit of the target
            if need_grad:  # d(sum CE)/d logits = softmax - one-hot
                p.div_(total)
                p[torch.arange(p.shape[0], device=p.device), t] -= 1
                torch.mm(p.to(weight.dtype), weight, out=grad[i:i + chunk])
            del logits, p  # p is the same buffer: both names must go before the next chunk's logits
        if need_grad:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None


def fused_head_ok(head: nn.Module, hidden: torch.Tensor) -> bool:
    """Whether `linear_cross_entropy` may stand in for `head` + cross-entropy: a plain nn.Linear
    (no subclass, no hooks: FSDP, offload or quantization wrappers keep the plain path) with no
    trainable parameter, and a weight that fits `hidden`."""
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return False
    w, b = head.weight, head.bias
    if w.requires_grad or (b is not None and b.requires_grad):
        return False
    return (type(w) in (torch.Tensor, nn.Parameter) and w.dim() == 2 and w.shape[1] == hidden.shape[-1]
            and w.device == hidden.device and w.dtype == hidden.dtype)


def linear_cross_entropy(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Summed cross-entropy of a frozen linear head over rows of `hidden` (no ignored targets):
    equal to `F.cross_entropy(head(hidden).float(), targets, reduction="sum")`, holding at most
    `chunk` rows of logits at a time and saving only d loss / d hidden for backward."""
    return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, max(1, int(chunk)))


# --------------------------------------------------------------------------- SwiGLU


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up, saving gate and up only (not silu(gate))."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad):
        # The same kernels autograd runs for F.silu(gate) * up, so the same values to the bit.
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = F.silu(gate).mul_(grad)
        if ctx.needs_input_grad[0]:
            grad_gate = grad * up
            torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up; under autograd it saves two tensors instead of three."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad) and gate.shape == up.shape:
        return _SiluMul.apply(gate, up)
    return F.silu(gate) * up


def _lean_swiglu_forward(self, x):
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


_SWIGLU_CLASSES: dict[type, bool] = {}


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, (nn.SiLU, SiLUActivation))


def _forward_is_swiglu(cls: type) -> bool:
    """Whether cls.forward(self, x) is exactly `return self.down_proj(self.act_fn(self.gate_proj(x)) *
    self.up_proj(x))` (optionally through one local variable), read from its source."""
    if cls in _SWIGLU_CLASSES:
        return _SWIGLU_CLASSES[cls]
    ok = False
    try:
        fn = ast.parse(textwrap.dedent(inspect.getsource(cls.forward))).body[0]
        args = fn.args
        if (isinstance(fn, ast.FunctionDef) and len(args.args) == 2 and not (args.vararg or args.kwarg or
                                                                               args.kwonlyargs or args.defaults)):
            x = args.args[1].arg
            want = ast.dump(ast.parse(f"self.down_proj(self.act_fn(self.gate_proj({x})) * self.up_proj({x}))",
                                      mode="eval").body)
            body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
            if len(body) == 1 and isinstance(body[0], ast.Return) and body[0].value is not None:
                ok = ast.dump(body[0].value) == want
            elif (len(body) == 2 and isinstance(body[0], ast.Assign) and len(body[0].targets) == 1
                  and isinstance(body[0].targets[0], ast.Name) and isinstance(body[1], ast.Return)
                  and isinstance(body[1].value, ast.Name) and body[1].value.id == body[0].targets[0].id):
                ok = ast.dump(body[0].value) == want
    except (OSError, TypeError, SyntaxError, IndexError):
        ok = False
    _SWIGLU_CLASSES[cls] = ok
    return ok


def patch_swiglu(model: nn.Module) -> int:
    """Give every SwiGLU MLP of `model` the memory-lean forward; returns how many were patched.

    A module qualifies when its class forward is exactly down(act(gate(x)) * up(x)), its act_fn is
    SiLU, and nothing already replaced its forward on the instance. Idempotent."""
    n = 0
    for module in model.modules():
        if "forward" in vars(module):  # patched already (by us, Liger or anyone else)
            n += getattr(module.forward, "__func__", None) is _lean_swiglu_forward
            continue
        if not all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            continue
        if not _is_silu(module.act_fn) or not _forward_is_swiglu(type(module)):
            continue
        module.forward = types.MethodType(_lean_swiglu_forward, module)
        n += 1
    if n:
        log.debug("memory-lean SwiGLU forward on %d MLP modules", n)
    return n


def unpatch_swiglu(model: nn.Module) -> int:
    """Undo `patch_swiglu` (the class forward again); returns how many were restored."""
    n = 0
    for module in model.modules():
        if getattr(vars(module).get("forward"), "__func__", None) is _lean_swiglu_forward:
            del module.forward
            n += 1
    return n


# --------------------------------------------------------------------------- attention

LEAN_SDPA = "finetune_lean_sdpa"  # the attention implementation name patch_attention registers

_last_mask: list = []  # [(weakref to a boolean mask, its version, dtype, weakref to its float form)]


def _float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive form of a boolean mask (0 where attended, -inf elsewhere, as torch's own SDPA
    conversion), made once for all the layers of a forward, which keep it for backward. Only weak
    references are held here: the float mask lives as long as autograd keeps it."""
    if _last_mask:
        ref, version, dt, out_ref = _last_mask[0]
        out = out_ref()
        if out is not None and ref() is mask and version == mask._version and dt == dtype:
            return out
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask.logical_not(), float("-inf"))
    _last_mask[:] = [(weakref.ref(mask), mask._version, dtype, weakref.ref(out))]
    return out


def lean_sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                is_causal=None, **kwargs):
    """transformers' sdpa attention function, minus the k/v repeat and the per-layer mask
    conversion, for a boolean mask on the CPU; everything else is passed to it unchanged."""
    if (query.device.type != "cpu" or attention_mask is None or attention_mask.dtype != torch.bool
            or kwargs.get("output_attentions") or query.dim() != 4 or key.shape[1] == 0
            or query.shape[1] % key.shape[1]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # With a mask, transformers' function never sets is_causal (the mask carries the causality).
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=_float_mask(attention_mask, query.dtype),
                                         dropout_p=dropout, scale=scaling, is_causal=False,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _register_lean_sdpa() -> None:
    AttentionInterface.register(LEAN_SDPA, lean_sdpa_attention_forward)
    AttentionMaskInterface.register(LEAN_SDPA, sdpa_mask)  # the masks transformers makes for sdpa


def patch_attention(model: nn.Module) -> bool:
    """Switch a transformers model (or a peft model around one) that uses "sdpa" attention to the
    lean variant; True if it did. Models on another implementation, or that cannot switch, are
    left alone."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if getattr(config, "_attn_implementation", None) == LEAN_SDPA:
        return True
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(base, "set_attn_implementation"):
        return False
    can_set = getattr(base, "_can_set_attn_implementation", None)
    if can_set is None or not can_set():
        return False
    _register_lean_sdpa()
    try:
        base.set_attn_implementation(LEAN_SDPA)
    except (ValueError, ImportError, KeyError) as e:
        log.debug("lean attention not applied: %s", e)
        return False
    if base.config._attn_implementation != LEAN_SDPA:
        return False
    log.debug("memory-lean sdpa attention on %s", type(base).__name__)
    return True


def unpatch_attention(model: nn.Module) -> None:
    """Back to transformers' own sdpa attention (after `patch_attention`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) == LEAN_SDPA:
        base.set_attn_implementation("sdpa")
