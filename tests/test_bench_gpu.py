"""bench/gpu_check.sh and bench/gpu_qlora.py rehearsed on the CPU (tiny shape, bf16 compute, the
GPU calls skipped): the whole one-call check (slow), and in the default run its workers in this
process: our loop and the fair HF baseline on the same batches, --warmup 0, dtypes recorded."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")


@pytest.fixture
def smoke_bench(monkeypatch):
    """bench/gpu_qlora.py imported fresh with --cpu-smoke's environment."""
    monkeypatch.setenv("GPU_QLORA_CPU_SMOKE", "1")
    monkeypatch.setenv("FINETUNE_CPU_PRECISION", "bf16")
    monkeypatch.syspath_prepend(str(BENCH))
    for name in ("gpu_runner", "gpu_qlora", "gpu_parts"):
        sys.modules.pop(name, None)
    gq = importlib.import_module("gpu_qlora")
    # the workers patch these for timing; monkeypatch puts them back afterwards
    from finetune.training import loop
    from finetune.training.objectives.sft import CausalLMLoss
    from finetune.training.progress import TrainProgress

    monkeypatch.setattr(CausalLMLoss, "_forward", CausalLMLoss._forward)
    monkeypatch.setattr(TrainProgress, "update", TrainProgress.update)
    monkeypatch.setattr(loop, "build_step", loop.build_step)
    monkeypatch.setattr(loop.report, "micro_batch", loop.report.micro_batch)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield gq
    torch.set_num_threads(n)
    for name in ("gpu_runner", "gpu_qlora", "gpu_parts"):
        sys.modules.pop(name, None)


def test_workers_train_the_same_batches_with_warmup_0_and_record_dtypes(smoke_bench, tmp_path):
    gq = smoke_bench
    assert gq.SMOKE
    model_dir = gq.worker_build({"shape": "tiny", "cache": str(tmp_path)})["model_dir"]
    data = gq.synthetic_data(tmp_path / "data.jsonl", rows=40, lo=100, hi=300)
    spec = {"model_dir": model_dir, "data": str(data), "seq": 128, "micro": 1, "steps": 2, "warmup": 0,
            "overrides": gq.OURS_VARIANTS["ours-ckpt"]}
    ours, base = gq.worker_ours(spec), gq.worker_baseline(spec)
    for res in (ours, base):
        assert res["steps"] == 2 and res["tokens_per_s"] > 0 and res["trained_tokens"] > 0  # warmup 0 timed
        json.dumps(res)  # what the parent reads back
    assert ours["trained_tokens"] == base["trained_tokens"]  # the same packed batches
    # the same first batch, LoRA B = 0 at the start: the same loss within bf16 rounding
    assert abs(ours["losses"][0] - base["losses"][0]) <= 0.02 * base["losses"][0], (ours["losses"], base["losses"])
    # ours keeps the frozen embeddings/head/norms in bf16; peft's k-bit preparation (the baseline) in fp32
    assert set(ours["static_bytes_by_dtype"]["unquantized_weights"]) == {"bfloat16"}
    assert set(base["static_bytes_by_dtype"]["unquantized_weights"]) == {"float32"}
    for res in (ours, base):  # the load-time peak recorded apart from the training peak
        assert {"load_peak_allocated_bytes", "load_peak_reserved_bytes", "peak_reserved_bytes"} <= set(res)


def test_ours_at_auto_micro_batch_records_what_it_picked_and_times_accumulation(smoke_bench, tmp_path):
    """The `best` part's ours worker: train.micro_batch_size=auto in the real loop (on the CPU the
    planner's cap, a divisor of the global batch), several micro-batches per step timed as one
    step, and which kernels auto chose (on the CPU: no Liger, the lean sdpa attention)."""
    gq = smoke_bench
    model_dir = gq.worker_build({"shape": "tiny", "cache": str(tmp_path)})["model_dir"]
    data = gq.synthetic_data(tmp_path / "data.jsonl", rows=40, lo=100, hi=300)
    res = gq.worker_ours({"model_dir": model_dir, "data": str(data), "seq": 128, "micro": "auto", "steps": 2,
                          "warmup": 1, "overrides": {**gq.OURS_VARIANTS["ours-ckpt"], "train.global_batch_size": "4"}})
    assert res["micro_batch"] == 4 and res["steps"] == 2 and res["tokens_per_s"] > 0
    assert res["liger"] is False and res["attention"] == "finetune_lean_sdpa"
    json.dumps(res)


def test_best_halves_the_baseline_micro_batch_on_oom(smoke_bench, tmp_path):
    """`best`: the baseline searched from --best_start down, halving on OOM or on a run that does not
    fit 11.5 GiB, ours once at auto; the speedup is over the baseline's largest that fits."""
    import types

    import gpu_parts

    GiB = 1024 ** 3
    calls = []

    class FakeRunner:
        out = {}

        def worker(self, name, kind, spec, min_s=30):
            calls.append((name, spec["micro"]))
            if kind == "ours":
                return {"ok": True, "micro_batch": 4, "tokens_per_s": 300.0, "peak_reserved_bytes": 9 * GiB}
            if spec["micro"] == 8:
                return {"ok": False, "oom": True, "error": "torch.OutOfMemoryError: CUDA out of memory"}
            if spec["micro"] == 4:  # ran, but over 11.5 GiB with its context
                return {"ok": True, "tokens_per_s": 150.0, "peak_reserved_bytes": 11.4 * GiB, "context_bytes": GiB}
            return {"ok": True, "tokens_per_s": 100.0, "peak_reserved_bytes": 10 * GiB, "context_bytes": GiB}

        def save(self):
            pass

    monkey_smoke = gpu_parts.SMOKE
    gpu_parts.SMOKE = False
    try:
        part = gpu_parts.part_best(types.SimpleNamespace(steps=3, warmup=1, best_start=8), FakeRunner(),
                                   tmp_path, tmp_path / "d.jsonl", 2048)
    finally:
        gpu_parts.SMOKE = monkey_smoke
    assert calls == [("best-ours-auto", "auto"), ("best-baseline-mb8", 8), ("best-baseline-mb4", 4),
                     ("best-baseline-mb2", 2)]
    assert part["baseline"]["micro_batch"] == 2 and part["speedup_vs_baseline"] == 3.0
    assert part["baseline_tries"]["8"]["oom"] and not part["baseline_tries"]["4"]["fits_12GiB_card"]
    assert part["summary"]["ours"]["micro_batch"] == 4


def test_fits_judges_11_5_GiB_with_the_measured_context_and_names_its_fields(smoke_bench):
    from gpu_runner import LIMIT, fits

    GiB = 1024 ** 3
    assert LIMIT == int(11.5 * GiB)
    res = {"ok": True, "peak_reserved_bytes": 11 * GiB, "context_bytes": int(0.6 * GiB),
           "end_non_torch_bytes": int(0.5 * GiB), "load_peak_reserved_bytes": 11 * GiB}
    f = fits(res)  # 11 + 0.6 > 11.5: over, though under 12 GiB
    assert not f["fits_12GiB_card"] and f["limit_GiB"] == 11.5 and f["context_GiB"] == 0.6
    assert f["train_peak_reserved_GiB"] == 11.0 and f["load_peak_reserved_GiB"] == 11.0 and not f["load_fits"]
    assert fits({**res, "peak_reserved_bytes": 8 * GiB})["fits_12GiB_card"]


def test_check_runs_the_7b_recipe_settings_within_the_default_budget(smoke_bench, monkeypatch):
    sys.modules.pop("gpu_check", None)
    gc = importlib.import_module("gpu_check")
    assert gc.DEFAULT_BUDGET_S <= 330
    monkeypatch.setattr(gc, "SMOKE", False)
    parts = gc.variants(2048)
    assert list(parts) == ["ours-ckpt", "ours-recipe", "ours-liger-off", "ours-compile", "ours-offload"]  # by value
    assert parts["ours-liger-off"][2]["train.liger"] == "false" and parts["ours-compile"][2]["train.compile"] == "layers"
    assert {k: v for k, v in parts["ours-compile"][2].items() if k != "train.compile"} == parts["ours-ckpt"][2]
    seq, micro, ov = parts["ours-recipe"]
    assert (seq, micro) == (1024, 2) and ov["lora.dropout"] == "0.05"  # recipes/qlora-7b-alpaca.yaml
    assert parts["ours-ckpt"][:2] == (2048, 1)


def test_env_probe_pages_above_the_bitsandbytes_threshold():
    r = subprocess.run([sys.executable, str(BENCH / "gpu_env.py"), "--cpu-smoke"], capture_output=True, text=True,
                       timeout=300)
    out = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])
    assert out["bnb_ok"], out
    assert out["bnb_paged_probe_numel"] > 1e5  # bitsandbytes pages optimizer state only from 1e5 elements


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")]).returncode == 0


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_part(tmp_path):
    env = {**os.environ, "GPU_CHECK_PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path / "out"),
           "GPU_CHECK_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--cpu-smoke"], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["smoke"] and summary["env"]["bnb_ok"]
    assert summary["planner"]["predictions"]["ours-ckpt"]["peak_bytes"] > 0
    for part in ("ours-ckpt", "ours-recipe", "baseline-fair", "baseline-independent", "ours-offload"):
        assert summary["parts"][part]["ok"], (part, summary["parts"][part])
        assert summary["parts"][part]["tokens_per_s"] > 0
    assert summary["budget_s"] <= 330 and summary["env"]["bnb_paged_probe_numel"] > 1e5
    assert "speedup_ours_ckpt_vs_baseline-fair" in summary["verdict"]
    assert summary["verdict"]["limit_GiB"] == 11.5
    for part in ("ours-ckpt", "ours-recipe", "ours-offload", "baseline-fair"):
        fields = summary["parts"][part]
        assert {"limit_GiB", "context_GiB", "load_peak_reserved_GiB", "train_peak_reserved_GiB"} <= set(fields), part
        assert {"limit_GiB", "context_GiB", "load_peak_reserved_GiB", "train_peak_reserved_GiB"} <= \
            set(summary["verdict"][part])
    assert "ours-recipe" in summary["planner"]["predictions"]
    # the Liger on/off pair (on the CPU both off: auto is off there) and compile, run or skipped with a reason
    assert summary["parts"]["ours-liger-off"]["ok"] and "speedup_liger_on_vs_off" in summary["verdict"]
    assert summary["verdict"]["ours-ckpt"]["liger"] is False and summary["verdict"]["ours-liger-off"]["liger"] is False
    assert summary["verdict"]["ours-ckpt"]["attention"] == "finetune_lean_sdpa"
    compiled = summary["parts"]["ours-compile"]
    assert compiled["ok"] or compiled["skipped"] == "train.compile is not a setting in this checkout", compiled
    if compiled["ok"]:
        assert "speedup_compile_vs_not" in summary["verdict"] and "ours-compile" in summary["planner"]["predictions"]
    logs = {p.name for p in (tmp_path / "out" / "logs").iterdir()}
    assert {"env.log", "ours-ckpt.log", "baseline-fair.log", "baseline-independent.log"} <= logs
