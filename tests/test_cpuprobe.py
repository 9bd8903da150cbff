"""finetune.cpuprobe: precision=auto's CPU choice read without torch, as runtime caches it."""

import json
import os
import subprocess
import sys

import pytest
import torch

from finetune import cpuprobe, runtime
from finetune.config import load_config
from finetune.errors import UsageError
from finetune.plan.predict import predict


@pytest.fixture
def probe_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    monkeypatch.delenv(cpuprobe.CPU_PRECISION_ENV, raising=False)
    return tmp_path


@pytest.mark.parametrize("bf16_gflops, expect", [(400.0, "bf16-true"), (20.0, "32-true")])
def test_the_planner_reads_what_the_runtime_cached(probe_env, monkeypatch, bf16_gflops, expect):
    assert cpuprobe.planned_cpu_precision() is None  # nothing cached yet: the planner counts fp32
    cfg = load_config("tiny-lora", {})
    unprobed = predict(cfg)
    assert "precision" in unprobed.notes and unprobed.peak_bytes == predict(load_config("tiny-lora", {"precision": "32-true"})).peak_bytes
    monkeypatch.setattr(runtime, "_matmul_gflops", lambda dtype, reps=5: bf16_gflops if dtype == torch.bfloat16 else 100.0)
    runtime.cpu_probe()  # what any training run or measure=true does first
    assert cpuprobe.planned_cpu_precision() == expect == runtime.planned_precision(cfg, "cpu")
    assert predict(cfg).peak_bytes == predict(load_config("tiny-lora", {"precision": expect})).peak_bytes


def test_disagreeing_or_foreign_cache_files_are_not_guessed_from(probe_env):
    d = probe_env / "cpu-precision"
    d.mkdir()
    key = runtime._cpu_key()
    (d / "torn.json").write_text("{torn")
    (d / "other-cpu.json").write_text(json.dumps({"cpu": "another CPU|" + key.split("|", 1)[1], "bf16_faster": True}))
    assert cpuprobe.cached_bf16_faster() is None
    (d / "a.json").write_text(json.dumps({"cpu": key, "bf16_faster": True}))
    assert cpuprobe.cached_bf16_faster() is True
    (d / "b.json").write_text(json.dumps({"cpu": key.rsplit("|", 1)[0] + "|threads 99", "bf16_faster": False}))
    assert cpuprobe.cached_bf16_faster() is None


def test_the_override_wins_and_a_bad_one_is_one_line(probe_env, monkeypatch):
    for forced, expect in (("bf16", "bf16-true"), ("fp32", "32-true")):
        monkeypatch.setenv(cpuprobe.CPU_PRECISION_ENV, forced)
        assert cpuprobe.planned_cpu_precision() == expect
    monkeypatch.setenv(cpuprobe.CPU_PRECISION_ENV, "fp8")
    with pytest.raises(UsageError, match="expected fp32 or bf16"):
        cpuprobe.planned_cpu_precision()


def test_reading_the_probe_imports_no_torch(probe_env):
    (probe_env / "cpu-precision").mkdir()
    (probe_env / "cpu-precision" / "a.json").write_text(json.dumps({"cpu": runtime._cpu_key(), "bf16_faster": True}))
    code = ("import sys; from finetune.cpuprobe import planned_cpu_precision; "
            "assert planned_cpu_precision() == 'bf16-true'; assert 'torch' not in sys.modules; print('ok')")
    env = {k: v for k, v in os.environ.items() if k != cpuprobe.CPU_PRECISION_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
