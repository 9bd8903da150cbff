"""finetune.kernels: what train.liger=auto and model.attn_implementation=auto pick on each device,
decided once for training (finetune.runtime) and the planner (finetune.plan.predict)."""

import pytest

from finetune import kernels


@pytest.fixture
def have(monkeypatch):
    """Pretend exactly the named optional modules are installed."""
    def set_installed(*names):
        monkeypatch.setattr(kernels, "installed", lambda module: module in names)
    return set_installed


def test_liger_auto_is_on_only_on_a_gpu_with_liger_installed(have):
    have(kernels.LIGER_MODULE)
    assert kernels.liger_on("auto", on_gpu=True) and kernels.liger_on(None, on_gpu=True)
    assert not kernels.liger_on("auto", on_gpu=False)  # Triton kernels: never on the CPU by default
    have()
    assert not kernels.liger_on("auto", on_gpu=True)
    # explicit settings are the user's (true on the CPU is refused where Liger is applied)
    assert kernels.liger_on(True, on_gpu=False) and not kernels.liger_on(False, on_gpu=True)


def test_attention_auto_is_flash_varlen_on_a_gpu_with_flash_attn(have):
    have(kernels.FLASH_MODULE)
    assert kernels.attention("auto", on_gpu=True) == "flash_attention_2"
    assert kernels.varlen("flash_attention_2") and not kernels.varlen("sdpa")
    assert kernels.attention("auto", on_gpu=False) == "sdpa"  # the lean CPU attention builds on it
    have()
    assert kernels.attention("auto", on_gpu=True) == "sdpa"
    for explicit in ("sdpa", "eager", "flash_attention_2", "flex_attention"):
        assert kernels.attention(explicit, on_gpu=False) == explicit


def test_installed_finds_without_importing():
    assert kernels.installed("json") and not kernels.installed("no_such_module_xyz")
