"""finetune.memory.lean gives the plain path's loss and gradients (CPU, tiny model), and patches only what
it recognises; finetune.memory.malloc sets glibc's mmap threshold once and respects the user's choice."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finetune.memory import lean
from finetune.data.pack import collate, pack
from finetune.training.objectives.sft import CausalLMLoss
from tiny_peft import make_model

TOL = dict(atol=1e-5, rtol=1e-5)


def packed_batch():
    gen = torch.Generator().manual_seed(0)
    examples = []
    for i in range(5):
        ids = torch.randint(3, 259, (9 + 7 * i,), generator=gen).tolist()
        prompt = len(ids) // 3
        examples.append((ids, [-100] * prompt + ids[prompt:]))
    return collate(pack(examples, 64), pad_id=0)


def loss_and_grads(model, batch, chunk):
    model.zero_grad(set_to_none=True)
    loss, n = CausalLMLoss(model, chunk=chunk)(batch["input_ids"], batch["labels"], batch["position_ids"])
    (loss / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach(), grads


def assert_same(a, b, **tol):
    torch.testing.assert_close(a[0], b[0], **(tol or TOL))
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], **(tol or TOL), msg=k)


# --------------------------------------------------------------------------- head + cross-entropy


@pytest.mark.parametrize("chunk", [1, 7, 4096])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_equals_plain(chunk, bias):
    gen = torch.Generator().manual_seed(0)
    head = nn.Linear(16, 50, bias=bias).requires_grad_(False)
    hidden = torch.randn(23, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (23,), generator=gen)
    plain = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    (g_plain,) = torch.autograd.grad(plain * 0.37, hidden)
    assert lean.fused_head_ok(head, hidden)
    fused = lean.linear_cross_entropy(head, hidden, targets, chunk)
    (g_fused,) = torch.autograd.grad(fused * 0.37, hidden)
    torch.testing.assert_close(fused, plain, **TOL)
    torch.testing.assert_close(g_fused, g_plain, **TOL)
    with torch.no_grad():  # validation: a loss, nothing kept
        torch.testing.assert_close(lean.linear_cross_entropy(head, hidden, targets, chunk), plain.detach(), **TOL)


def test_linear_cross_entropy_holds_one_chunk_of_logits_at_a_time():
    from finetune.training.measure import _cpu_step_peak

    gen = torch.Generator().manual_seed(0)
    head = nn.Linear(32, 4096, bias=False).requires_grad_(False)
    hidden = torch.randn(512, 32, generator=gen, requires_grad=True)
    targets = torch.randint(0, 4096, (512,), generator=gen)
    chunk_bytes = 128 * 4096 * 4  # 2 MiB of fp32 logits per chunk of 128 rows

    peak = _cpu_step_peak(lambda: lean.linear_cross_entropy(head, hidden, targets, 128))
    # one chunk of logits + the kept d loss / d hidden (64 KiB) + small per-row vectors; the next
    # chunk's logits must not be allocated while the last one is still referenced
    assert chunk_bytes < peak < 1.25 * chunk_bytes, peak


def test_linear_cross_entropy_bf16_close_to_plain():
    gen = torch.Generator().manual_seed(0)
    head = nn.Linear(32, 64, bias=False).to(torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(17, 32, generator=gen).to(torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, 64, (17,), generator=gen)
    plain = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    (g_plain,) = torch.autograd.grad(plain, hidden)
    fused = lean.linear_cross_entropy(head, hidden, targets, 5)
    (g_fused,) = torch.autograd.grad(fused, hidden)
    assert fused.dtype == torch.float32 and g_fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(g_fused, g_plain, atol=1e-2, rtol=1e-2)


def test_fused_head_only_for_a_frozen_plain_linear():
    hidden = torch.randn(3, 8)
    head = nn.Linear(8, 10, bias=False).requires_grad_(False)
    assert lean.fused_head_ok(head, hidden)
    assert not lean.fused_head_ok(nn.Linear(8, 10), hidden)  # trainable head: its gradient is needed
    assert not lean.fused_head_ok(head, torch.randn(3, 8, dtype=torch.float64))

    class Subclass(nn.Linear):
        pass

    assert not lean.fused_head_ok(Subclass(8, 10).requires_grad_(False), hidden)
    handle = head.register_forward_hook(lambda *a: None)  # wrappers hooking the head keep the plain path
    assert not lean.fused_head_ok(head, hidden)
    handle.remove()


@pytest.mark.parametrize("chunk", [7, 4096])
def test_chunked_loss_uses_fused_head_with_plain_parity(chunk, monkeypatch):
    # chunk 0 is the plain path: full logits + F.cross_entropy through autograd.
    model = make_model(**{"train.lean_activations": "false"})
    batch = packed_batch()
    calls = []
    real = lean.linear_cross_entropy
    monkeypatch.setattr(lean, "linear_cross_entropy", lambda *a: calls.append(a[1].shape[0]) or real(*a))
    fused = loss_and_grads(model, batch, chunk)
    n_trained = int((batch["labels"][:, 1:] != -100).sum())
    assert calls == [n_trained], "the frozen tiny head takes the fused path, on trained positions only"
    assert_same(loss_and_grads(model, batch, 0), fused)


# --------------------------------------------------------------------------- SwiGLU


def test_silu_mul_same_values_and_grads_as_autograd():
    gen = torch.Generator().manual_seed(0)
    gate = torch.randn(4, 6, 10, generator=gen, requires_grad=True)
    up = torch.randn(4, 6, 10, generator=gen, requires_grad=True)
    g = torch.randn(4, 6, 10, generator=gen)
    plain = F.silu(gate) * up
    ref = torch.autograd.grad(plain, (gate, up), g)
    out = lean.silu_mul(gate, up)
    got = torch.autograd.grad(out, (gate, up), g)
    assert torch.equal(out, plain)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # the same kernels: bit for bit
    # Only one input needing a gradient (e.g. a frozen gate branch) still works.
    (only_up,) = torch.autograd.grad(lean.silu_mul(gate.detach(), up), (up,), g)
    torch.testing.assert_close(only_up, ref[1], atol=0, rtol=0)


def test_swiglu_saves_two_tensors_not_three():
    gate = torch.randn(8, 16, requires_grad=True)
    up = torch.randn(8, 16, requires_grad=True)

    def saved_bytes(fn):
        total = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel()) or t, lambda t: t):
            fn()
        return sum(total)

    assert saved_bytes(lambda: F.silu(gate) * up) == 3 * 8 * 16
    assert saved_bytes(lambda: lean.silu_mul(gate, up)) == 2 * 8 * 16


def test_patch_swiglu_parity_on_the_tiny_model():
    plain = make_model(**{"train.lean_activations": "false"})
    patched = make_model(**{"train.lean_activations": "true"})
    mlps = [m for m in patched.modules() if type(m).__name__ == "LlamaMLP"]
    assert mlps and all(m.forward.__func__ is lean._lean_swiglu_forward for m in mlps)
    assert not any("forward" in vars(m) for m in plain.modules())
    batch = packed_batch()
    for chunk in (0, 7):
        assert_same(loss_and_grads(plain, batch, chunk), loss_and_grads(patched, batch, chunk))
    assert lean.unpatch_swiglu(patched) == len(mlps) and lean.patch_swiglu(patched) == len(mlps)
    assert lean.patch_swiglu(patched) == len(mlps)  # idempotent


class _Proj(nn.Module):
    def __init__(self, act=None):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)
        self.act_fn = act or nn.SiLU()


class GeluMLP(_Proj):
    def __init__(self):
        super().__init__(nn.GELU())

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ScaledMLP(_Proj):
    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) * 2


class SwappedMLP(_Proj):
    def forward(self, x):
        return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))


class StandardMLP(_Proj):
    """Same form as transformers' LlamaMLP, written the other accepted way (one return)."""

    def forward(self, hidden):
        return self.down_proj(self.act_fn(self.gate_proj(hidden)) * self.up_proj(hidden))


def test_patch_swiglu_leaves_other_modules_alone():
    model = nn.ModuleList([GeluMLP(), ScaledMLP(), SwappedMLP(), StandardMLP()])
    assert lean.patch_swiglu(model) == 1
    assert ["forward" in vars(m) for m in model] == [False, False, False, True]
    x = torch.randn(3, 4)
    torch.testing.assert_close(model[3](x), type(model[3]).forward(model[3], x), atol=0, rtol=0)


# --------------------------------------------------------------------------- attention


def test_patch_attention_parity_on_the_tiny_model(monkeypatch):
    # The tiny Llama has 4 query heads over 2 k/v heads, so the GQA path is exercised.
    model = make_model(**{"train.lean_activations": "false"})
    base = model.get_base_model()
    assert base.config._attn_implementation == "sdpa"
    batch = packed_batch()
    plain = {chunk: loss_and_grads(model, batch, chunk) for chunk in (0, 7)}
    calls = []
    real = lean.F.scaled_dot_product_attention
    monkeypatch.setattr(lean.F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append((a[1].shape[1], k["attn_mask"].dtype)) or real(*a, **k))
    assert lean.patch_attention(model) and base.config._attn_implementation == lean.LEAN_SDPA
    try:
        for chunk in (0, 7):
            assert_same(plain[chunk], loss_and_grads(model, batch, chunk))
    finally:
        lean.unpatch_attention(model)
    n_layers = base.config.num_hidden_layers
    assert calls == [(base.config.num_key_value_heads, torch.float32)] * (2 * n_layers)  # k/v unrepeated
    assert base.config._attn_implementation == "sdpa"


def test_lean_attention_keeps_one_mask_and_unrepeated_kv():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=gen, requires_grad=True)
    k = torch.randn(2, 2, 6, 8, generator=gen, requires_grad=True)
    v = torch.randn(2, 2, 6, 8, generator=gen, requires_grad=True)
    seg = torch.tensor([0, 0, 0, 1, 1, 1])
    mask = ((seg[:, None] == seg[None, :]) & torch.ones(6, 6, dtype=torch.bool).tril())[None, None].expand(2, 1, 6, 6)

    class Attn(nn.Module):
        num_key_value_groups = 2

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def run(fn, layers=3):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            outs = [fn(Attn(), q, k, v, mask, scaling=0.3)[0] for _ in range(layers)]
        grads = torch.autograd.grad(sum(o.sum() for o in outs), (q, k, v))
        return outs[0], grads, saved

    out_ref, grads_ref, saved_ref = run(sdpa_attention_forward)
    out, grads, saved = run(lean.lean_sdpa_attention_forward)
    torch.testing.assert_close(out, out_ref, **TOL)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, **TOL)
    masks = {t.untyped_storage().data_ptr() for t in saved if t.shape == (2, 1, 6, 6)}
    assert len(masks) == 1  # one float mask for all layers (transformers' path: one per layer)
    per_head = lambda ts: sum(t.shape == (2, 4, 6, 8) for t in ts)  # noqa: E731
    assert per_head(saved_ref) == 3 * 4 and per_head(saved) == 3 * 2  # q, out (+ repeated k, v before)
    assert sum(t.shape == (2, 2, 6, 8) for t in saved) == 3 * 2  # k, v as they are
    assert sum(t.numel() for t in saved) < sum(t.numel() for t in saved_ref)


def test_lean_attention_defers_to_transformers_without_a_boolean_mask(monkeypatch):
    seen = []
    monkeypatch.setattr(lean, "sdpa_attention_forward", lambda *a, **k: seen.append(a[4]) or ("stock", None))
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    for mask in (None, torch.zeros(1, 1, 3, 3)):
        assert lean.lean_sdpa_attention_forward(nn.Module(), q, k, k, mask)[0] == "stock"
    assert len(seen) == 2


def test_patch_attention_leaves_eager_models_alone():
    model = make_model(**{"model.attn_implementation": "eager"})
    assert model.get_base_model().config._attn_implementation == "eager"
    assert not lean.patch_attention(model)
    assert model.get_base_model().config._attn_implementation == "eager"


# --------------------------------------------------------------------------- malloc


def test_fix_mmap_threshold_once_and_respects_the_environment(monkeypatch):
    from finetune.memory import malloc

    monkeypatch.setattr(malloc, "_applied", [])
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert malloc.fix_mmap_threshold() is False and malloc._applied == []
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    import platform
    import sys

    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert malloc.fix_mmap_threshold() is expected
    assert malloc.fix_mmap_threshold() is expected  # a second call is a no-op
    assert malloc._applied == ([malloc.MMAP_THRESHOLD] if expected else [])
