"""finetune.memory.apply: the memory features go on in one order (malloc, lean, Liger, tiles), only
when the recipe asks, and settings a device cannot run are one-line usage errors."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from finetune.errors import UsageError
from finetune.memory import apply, lean, malloc, tiled
from finetune.memory.apply import MemoryFeatures, apply_memory_features
from finetune.models.load import load_model
from tiny_peft import make_cfg


def plain_model(**overrides):
    """The tiny peft model as load_model gives it: no memory feature applied yet."""
    cfg = make_cfg(**overrides)
    return load_model(cfg, "cpu", gradient_checkpointing=False), cfg


def mlps(model):
    return list(tiled.decoder_mlps(model))


def test_load_model_applies_no_memory_feature():
    model, _ = plain_model(**{"train.lean_activations": "true", "train.mlp_tile_size": "7"})
    assert not any("forward" in vars(m) for m in model.modules())
    assert model.get_base_model().config._attn_implementation == "sdpa"


def test_off_means_untouched(monkeypatch):
    monkeypatch.setattr(malloc, "_applied", [])
    monkeypatch.setattr(apply, "fix_mmap_threshold", lambda: pytest.fail("threshold set although off"))
    model, cfg = plain_model(**{"train.lean_activations": "false", "train.fixed_mmap_threshold": "false"})
    assert apply_memory_features(model, cfg.train, "cpu") == MemoryFeatures()
    assert not any("forward" in vars(m) for m in model.modules())


def test_cpu_order_malloc_lean_tiles(monkeypatch):
    calls = []
    monkeypatch.setattr(apply, "fix_mmap_threshold", lambda: calls.append("malloc") or True)
    model, cfg = plain_model(**{"train.lean_activations": "true", "train.mlp_tile_size": "7"})
    done = apply_memory_features(model, cfg.train, "cpu")
    assert calls == ["malloc"]
    assert done == MemoryFeatures(mmap_threshold=True, lean_mlps=2, lean_attention=True, liger=False, tiled_mlps=2)
    # The tiles run the lean forward: tiling came after it.
    assert all(m._finetune_untiled_forward.__func__ is lean._lean_swiglu_forward for m in mlps(model))
    assert model.get_base_model().config._attn_implementation == lean.LEAN_SDPA
    lean.unpatch_attention(model)


def test_the_threshold_is_a_cpu_setting(monkeypatch):
    monkeypatch.setattr(apply, "fix_mmap_threshold", lambda: pytest.fail("threshold set for a GPU run"))
    model, cfg = plain_model(**{"train.lean_activations": "false", "train.liger": "false"})
    assert apply_memory_features(model, cfg.train, torch.device("cuda", 0)) == MemoryFeatures()


def fake_liger(monkeypatch):
    """A liger_kernel stand-in that, like Liger, gives every MLP an instance forward of its own."""
    def liger_forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def apply_to_instance(model, **kwargs):
        assert kwargs == {"cross_entropy": False, "fused_linear_cross_entropy": False}
        for m in mlps(model):
            m.forward = types.MethodType(liger_forward, m)

    module = types.ModuleType("liger_kernel.transformers")
    module._apply_liger_kernel_to_instance = apply_to_instance
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", module)
    return liger_forward


def test_liger_after_lean_and_tiles_after_liger(monkeypatch):
    liger_forward = fake_liger(monkeypatch)
    model, cfg = plain_model(**{"train.lean_activations": "true", "train.liger": "true", "train.mlp_tile_size": "7"})
    done = apply_memory_features(model, cfg.train, torch.device("cuda", 0))
    assert done.liger and done.lean_mlps == 2 and done.tiled_mlps == 2
    # Liger's forward replaced the lean one, and each tile runs Liger's.
    assert all(m.forward.__func__ is tiled._tiled_forward for m in mlps(model))
    assert all(m._finetune_untiled_forward.__func__ is liger_forward for m in mlps(model))
    lean.unpatch_attention(model)


def test_liger_on_cpu_is_one_line_usage_error():
    model, cfg = plain_model(**{"train.liger": "true"})
    with pytest.raises(UsageError) as e:
        apply_memory_features(model, cfg.train, torch.device("cpu"))
    msg = str(e.value)
    assert "\n" not in msg and "train.liger" in msg and "GPU" in msg


def test_liger_not_installed_is_one_line_usage_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import fails as if not installed
    model, cfg = plain_model(**{"train.liger": "true", "train.lean_activations": "false"})
    with pytest.raises(UsageError, match=r"liger-kernel is not installed: pip install liger-kernel$"):
        apply_memory_features(model, cfg.train, torch.device("cuda", 0))


def test_liger_auto_is_on_on_a_gpu_with_liger_and_off_on_the_cpu(monkeypatch):
    """train.liger=auto (the default): Liger goes on for a CUDA device where liger-kernel is
    installed, never on the CPU (where true is the one-line refusal above), and not where it is
    missing (auto never refuses)."""
    from finetune import kernels

    liger_forward = fake_liger(monkeypatch)
    monkeypatch.setattr(kernels, "installed", lambda module: module == kernels.LIGER_MODULE)
    model, cfg = plain_model(**{"train.lean_activations": "false", "train.fixed_mmap_threshold": "false"})
    assert cfg.train.liger == "auto"
    assert apply_memory_features(model, cfg.train, "cpu") == MemoryFeatures()
    assert apply_memory_features(model, cfg.train, torch.device("cuda", 0)).liger
    assert all(m.forward.__func__ is liger_forward for m in mlps(model))
    model, cfg = plain_model(**{"train.lean_activations": "false"})
    monkeypatch.setattr(kernels, "installed", lambda module: False)
    assert not apply_memory_features(model, cfg.train, torch.device("cuda", 0)).liger


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernels are Triton: CUDA only")
def test_liger_fused_linear_cross_entropy_fits_our_summed_loss():
    """Why Liger's fused linear cross-entropy could stand in for ours (finetune.memory.apply says why it
    stays off): with reduction="sum" it is the summed loss over the trained rows and its gradient
    wrt the hidden states, as finetune.memory.lean.linear_cross_entropy gives them."""
    liger_loss = pytest.importorskip("liger_kernel.transformers").LigerFusedLinearCrossEntropyLoss
    g = torch.Generator(device="cuda").manual_seed(0)
    head = torch.nn.Linear(64, 1000, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    targets = torch.randint(0, 1000, (300,), device="cuda", generator=g)
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    ours = lean.linear_cross_entropy(head, h1, targets, 128)
    theirs = liger_loss(reduction="sum")(head.weight, h2, targets)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(theirs.float(), ours, rtol=2e-3, atol=0)
    torch.testing.assert_close(h2.grad.float(), h1.grad.float(), rtol=2e-2, atol=2e-3)
