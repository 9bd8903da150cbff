"""precision=auto on the CPU (finetune.runtime): a short bf16-vs-fp32 matmul probe, cached per CPU
in the cache root, keeps the frozen weights in bf16 where bf16 measures faster and fp32 where it
doesn't; the LoRA weights stay fp32 either way, and the loss follows fp32's."""

import json

import pytest
import torch

from finetune import runtime
from finetune.config import Config, load_config
from finetune.errors import UsageError
from finetune.models.load import load_tokenizer
from finetune.training.build import build_step
from tiny_peft import train_losses


@pytest.fixture
def probe_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    monkeypatch.delenv(runtime.CPU_PRECISION_ENV, raising=False)
    return tmp_path


def _fake_gflops(monkeypatch, fp32: float, bf16: float) -> None:
    monkeypatch.setattr(runtime, "_matmul_gflops", lambda dtype, reps=5: bf16 if dtype == torch.bfloat16 else fp32)


def test_probe_is_measured_once_per_cpu_and_cached(probe_env, monkeypatch):
    _fake_gflops(monkeypatch, 100.0, 400.0)
    first = runtime.cpu_probe()
    assert first["bf16_faster"] and first["fp32_gflops"] == 100.0
    files = list((probe_env / "cpu-precision").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["cpu"] == first["cpu"]

    def boom(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(runtime, "_matmul_gflops", boom)
    assert runtime.cpu_probe() == first  # from the cache
    files[0].write_text("{torn")
    _fake_gflops(monkeypatch, 100.0, 110.0)  # a torn file is measured again; 1.1x is below the margin
    assert runtime.cpu_probe()["bf16_faster"] is False


@pytest.mark.parametrize("fp32, bf16, expect", [(100.0, 400.0, torch.bfloat16), (100.0, 20.0, torch.float32)])
def test_auto_follows_the_probe_and_fabric_never_casts(probe_env, monkeypatch, fp32, bf16, expect):
    _fake_gflops(monkeypatch, fp32, bf16)
    cfg = Config()
    cfg.accelerator = "cpu"
    assert cfg.precision == "auto"  # the default
    assert runtime.base_dtype(cfg, "cpu") == expect == runtime.compute_dtype(cfg, "cpu")
    # Fabric gets 32-true: its bf16-true would cast the LoRA weights and their AdamW state too
    assert runtime.resolve_precision(cfg) == ("cpu", "32-true")
    assert runtime.planned_precision(cfg, "cpu") == ("bf16-true" if expect == torch.bfloat16 else "32-true")
    cfg.precision = None  # null means auto
    assert runtime.base_dtype(cfg, "cpu") == expect
    cfg.precision = "32-true"  # an explicit precision is the user's call
    assert runtime.base_dtype(cfg, "cpu") == torch.float32


def test_env_override_and_its_error(probe_env, monkeypatch):
    monkeypatch.setattr(runtime, "_matmul_gflops", lambda *a, **k: pytest.fail("no probe when forced"))
    monkeypatch.setenv(runtime.CPU_PRECISION_ENV, "bf16")
    assert runtime.cpu_auto_dtype() == torch.bfloat16
    monkeypatch.setenv(runtime.CPU_PRECISION_ENV, "fp32")
    assert runtime.cpu_auto_dtype() == torch.float32
    monkeypatch.setenv(runtime.CPU_PRECISION_ENV, "fp8")
    with pytest.raises(UsageError, match="expected fp32 or bf16"):
        runtime.cpu_auto_dtype()


def test_the_real_probe_runs_in_well_under_a_second_of_matmuls(probe_env):
    out = runtime.cpu_probe()
    assert out["fp32_gflops"] > 0 and out["bf16_gflops"] > 0 and isinstance(out["bf16_faster"], bool)


def _losses(monkeypatch, choice: str, steps: int = 6) -> tuple[list[float], dict]:
    monkeypatch.setenv(runtime.CPU_PRECISION_ENV, choice)
    cfg = load_config("tiny-lora", {"accelerator": "cpu", "lora.dropout": "0.0", "train.lr": "0.01",
                                    "train.optimizer": "adamw", "output.progress": "false"})
    torch.manual_seed(0)
    step = build_step(cfg, "cpu", load_tokenizer(cfg.model))
    dtypes = {"frozen": {p.dtype for p in step.model.parameters() if not p.requires_grad},
              "trained": {p.dtype for p in step.model.parameters() if p.requires_grad}}
    return train_losses(step, steps), dtypes


def test_bf16_auto_keeps_lora_fp32_and_the_loss_within_2_percent_of_fp32(monkeypatch):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls; two threads only wait for each other on a shared machine
    try:
        bf16, dt16 = _losses(monkeypatch, "bf16")
        fp32, dt32 = _losses(monkeypatch, "fp32")
    finally:
        torch.set_num_threads(n)
    assert dt16 == {"frozen": {torch.bfloat16}, "trained": {torch.float32}}
    assert dt32 == {"frozen": {torch.float32}, "trained": {torch.float32}}
    assert bf16[-1] < bf16[0] - 0.05  # it trains
    for a, b in zip(bf16, fp32):
        assert abs(a - b) <= 0.02 * b, (bf16, fp32)
