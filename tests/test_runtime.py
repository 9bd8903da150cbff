"""finetune.runtime: the one device and dtype policy (fp32 on CPU, bf16 on GPU) and Fabric's
accelerator/precision derived from it."""

import pytest
import torch

from finetune import runtime
from finetune.config import Config
from finetune.errors import UsageError

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without a GPU")


def test_device_and_dtypes():
    cfg = Config()
    assert runtime.default_device("cpu") == torch.device("cpu")
    assert runtime.compute_dtype(cfg, "cpu") == torch.float32
    assert runtime.base_dtype(cfg, "cpu") == torch.float32
    cfg.precision = "bf16-mixed"
    assert runtime.base_dtype(cfg, "cpu") == torch.float32  # bf16 on this CPU is pathologically slow
    cfg.quant.compute_dtype = "bfloat16"
    assert runtime.compute_dtype(cfg, "cpu") == torch.bfloat16
    assert runtime.storage_dtype(cfg, "cpu") == torch.uint8
    cfg.strategy = "fsdp"
    assert runtime.storage_dtype(cfg, "cpu") == torch.bfloat16
    with pytest.raises(UsageError, match="unknown accelerator"):
        runtime.default_device("tpu9")
    if not torch.cuda.is_available():
        assert runtime.default_device("auto") == torch.device("cpu")
        with pytest.raises(UsageError, match="no CUDA GPU"):
            runtime.default_device("cuda")


def test_explicit_half_precision_is_kept_on_cpu_and_fsdp_shares_one_dtype():
    cfg = Config()
    cfg.precision = "bf16-true"
    assert runtime.base_dtype(cfg, "cpu") == torch.bfloat16  # asked for outright: the user's call
    cfg.precision = "16-true"
    assert runtime.base_dtype(cfg, "cpu") == torch.float16
    cfg.precision, cfg.strategy = None, "fsdp"
    assert runtime.fsdp_param_dtype(cfg, "cpu") == torch.float32  # LoRA: the base dtype
    cfg.quant.mode, cfg.quant.compute_dtype = "nf4", "bfloat16"
    assert runtime.fsdp_param_dtype(cfg, "cpu") == torch.bfloat16  # QLoRA: the 4-bit storage dtype


def test_resolve_precision_for_fabric():
    cfg = Config()
    cfg.accelerator = "cpu"
    assert runtime.resolve_precision(cfg) == ("cpu", "32-true")
    cfg.precision = "bf16-mixed"
    assert runtime.resolve_precision(cfg) == ("cpu", "bf16-mixed")  # an explicit precision is kept
    cfg.accelerator, cfg.precision = "auto", None
    expected = ("cuda", "bf16-mixed") if torch.cuda.is_available() else ("cpu", "32-true")
    assert runtime.resolve_precision(cfg) == expected


@needs_no_gpu
def test_resolve_precision_refuses_a_missing_gpu_in_one_line():
    cfg = Config()
    for name in ("cuda", "gpu"):
        cfg.accelerator = name
        with pytest.raises(UsageError) as e:
            runtime.resolve_precision(cfg)
        assert str(e.value) == f"accelerator={name} but no CUDA GPU is visible; use accelerator=cpu"


def test_attention_follows_the_device(monkeypatch):
    """model.attn_implementation=auto as training loads it (finetune.kernels; train.liger=auto is
    finetune.memory.apply's, tests/memory/test_apply.py)."""
    from finetune import kernels

    monkeypatch.setattr(kernels, "installed", lambda module: True)  # liger-kernel and flash-attn "installed"
    cfg = Config()
    assert runtime.attention_implementation(cfg, "cpu") == "sdpa"
    assert runtime.attention_implementation(cfg, "cuda") == "flash_attention_2"
    cfg.model.attn_implementation = "sdpa"
    assert runtime.attention_implementation(cfg, "cuda") == "sdpa"


def test_flex_attention_cannot_train_on_the_cpu():
    cfg = Config()
    cfg.model.attn_implementation = "flex_attention"
    with pytest.raises(UsageError) as e:
        runtime.attention_implementation(cfg, "cpu")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model.attn_implementation=flex_attention cannot train on the CPU")
    assert runtime.attention_implementation(cfg, "cuda") == "flex_attention"
