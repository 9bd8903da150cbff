"""The project's one-call device check (run through bench/gpu_check.sh), <= 330 s of work by default.

    python bench/gpu_check.py [--out DIR] [--budget_s 330] [--steps 8] [--warmup 2] [--cpu-smoke]

The device allowance is 15 minutes for two calls, machine starts included: the default budget
leaves room for a second call. Parts run in order of value, each in its own process;
`DIR/summary.json` is rewritten the moment each part ends (a kill keeps what finished), every
process's whole output is in `DIR/logs/`:
1. env: versions, the GPU, bitsandbytes' NF4 and a paged AdamW 8-bit step on a parameter above
   bitsandbytes' 1e5-element paging threshold (bench/gpu_env.py); nothing else runs if it fails.
2. planner: finetune.plan.predict for every part below (arithmetic on config.json only).
3. build: a random-init Llama-2-7B-shape checkpoint in bf16 (bench/gpu_qlora.py's worker_build).
4. ours-ckpt: NF4 + double quant, bf16 compute, LoRA r=16 all-linear, seq 2048 packed,
   micro-batch 1, dropout 0, gradient checkpointing, paged AdamW 8-bit, through the real trainer.
5. ours-recipe: the same 7B with recipes/qlora-7b-alpaca.yaml's own settings (seq 1024,
   micro-batch 2, LoRA dropout 0.05, its loss chunk and optimizer).
6. baseline-fair: the same batches through plain transformers + peft + bitsandbytes as HF
   Trainer/TRL users run it (bf16 autocast, non-reentrant checkpointing; worker_baseline).
7. ours-liger-off: ours-ckpt with train.liger=false. ours-ckpt runs the default, auto (Liger on
   where liger-kernel is installed), so this is the on/off pair (skipped where it is not installed:
   ours-ckpt then ran without Liger already).
8. ours-compile: ours-ckpt with train.compile=layers (skipped in a checkout without that setting).
9. ours-offload: activation offload instead of checkpointing, if time is left.
10. baseline-independent: bench/hf_qlora_baseline.py, which shares no code with the project
   (its own random checkpoint: the most expensive part, so the last), if time is left.
Every worker is capped to 11.5 GiB less its own measured CUDA context (a "12 GB" card shows torch
about 11.7 GiB, and the context sits outside torch's cap), records its load-time peak apart from
its training peak (the cache emptied between them), and reports limit_GiB, context_GiB,
load_peak_reserved_GiB and train_peak_reserved_GiB. Then the verdict: tokens/s, those fields,
fits (training peak reserved + context <= 11.5 GiB), speedups, and the planner against what was
measured (static and peak), and what each of Liger and compile changed. Every part of ours records
which kernels it ran (liger, attention). `--cpu-smoke` rehearses all of it on a tiny shape on the CPU (its
numbers mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(BENCH), str(REPO)]

import gpu_qlora as gq  # noqa: E402 - after the path; imports nothing GPU-only
from gpu_runner import LIMIT, SMOKE, SMOKE_ENV, Runner, fits, hardware  # noqa: E402

GiB = 1024 ** 3
STATIC_WEIGHTS = ("quantized_weights", "unquantized_weights", "lora_params")
DEFAULT_BUDGET_S = 330  # two calls and two machine starts fit a 15-minute device allowance
RECIPE = "qlora-7b-alpaca"  # the 7B recipe whose own settings part ours-recipe trains
RECIPE_KEYS = ("data.seq_len", "train.micro_batch_size", "lora.dropout", "lora.r", "lora.alpha",
               "train.loss_chunk_size", "train.optimizer", "train.gradient_checkpointing")
PART_FIELDS = ("limit_GiB", "context_GiB", "load_peak_reserved_GiB", "train_peak_reserved_GiB")
OURS_PARTS = ("ours-ckpt", "ours-recipe", "ours-liger-off", "ours-compile", "ours-offload")  # by value
COMPILE = "layers"  # train.compile's value for ours-compile (the setting is helper h-compile's)


def recipe_settings(name: str = RECIPE) -> dict:
    """The recipe's own training settings (RECIPE_KEYS) as overrides, micro-batch and seq apart."""
    from finetune.config import load_config, to_dict

    d = to_dict(load_config(name, {}))
    values = {k: d[k.split(".")[0]][k.split(".")[1]] for k in RECIPE_KEYS}
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in values.items()}


def variants(seq: int) -> dict:
    """Each measured 7B part: (seq, micro-batch, overrides)."""
    rec = recipe_settings()
    rec_seq, rec_micro = int(rec.pop("data.seq_len")), int(rec.pop("train.micro_batch_size"))
    if SMOKE:
        rec_seq = min(rec_seq, seq)
    ckpt = gq.OURS_VARIANTS["ours-ckpt"]
    return {"ours-ckpt": (seq, 1, ckpt),
            "ours-recipe": (rec_seq, rec_micro, {**rec, "train.offload_activations": "false"}),
            "ours-liger-off": (seq, 1, {**ckpt, "train.liger": "false"}),
            "ours-compile": (seq, 1, {**ckpt, "train.compile": COMPILE}),
            "ours-offload": (seq, 1, gq.OURS_VARIANTS["ours-offload"])}


def unavailable(name: str):
    """Why part `name` cannot run in this checkout or environment (None: it can)."""
    from finetune import kernels
    from finetune.config import TrainConfig

    if name == "ours-compile" and "compile" not in {f.name for f in dataclasses.fields(TrainConfig)}:
        return "train.compile is not a setting in this checkout"
    if name == "ours-liger-off" and not SMOKE and not kernels.installed(kernels.LIGER_MODULE):
        return "liger-kernel is not installed: ours-ckpt ran without Liger already"
    return None


def _json_line(text: str, key: str):
    lines = [ln for ln in text.splitlines() if ln.startswith("{") and f'"{key}"' in ln]
    return json.loads(lines[-1]) if lines else None


def planner_part(run: Runner, shape: str, cache: Path, data: Path, seq: int, steps: int) -> None:
    from finetune.plan import predict as plan

    cfg_dir = cache / f"config-only-{shape}"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    (cfg_dir / "config.json").write_text(json.dumps({**gq.SHAPES[shape], "model_type": "llama"}))
    pred = {}
    for variant, (v_seq, v_micro, ov) in variants(seq).items():
        if unavailable(variant):
            continue
        cfg, _ = gq.ours_cfg(cfg_dir, data, v_seq, v_micro, steps, Path("unused"), **ov)
        p = plan.predict(cfg, v_micro, v_seq)
        pred[variant] = {"peak_bytes": p.peak_bytes, "parts": p.parts,
                         "allocated_bytes": p.peak_bytes - p.parts["cuda_context"] - p.parts["allocator_slack"],
                         "static_weights_bytes": sum(p.parts.get(k, 0) for k in STATIC_WEIGHTS)}
    run.out["planner"] = {"predictions": pred}
    run.save()
    print(f"-- planner: ours-ckpt predicted {pred['ours-ckpt']['peak_bytes'] / GiB:.2f} GiB", flush=True)


def verdict(out: dict) -> dict:
    parts, v = out["parts"], {}
    ok = {k: r for k, r in parts.items() if r.get("ok")}
    v["limit_GiB"] = round(LIMIT / GiB, 3)
    v["judgement"] = ("fits = training peak reserved + measured CUDA context <= 11.5 GiB (a 12 GB card shows "
                      "torch about 11.7 GiB); each worker capped to 11.5 GiB less its context")
    for name in (*OURS_PARTS, "baseline-fair"):
        r = ok.get(name)
        if r and "peak_reserved_bytes" in r:
            v[name] = {"tokens_per_s": r.get("tokens_per_s"), "peak_allocated_GiB": round(r["peak_allocated_bytes"] / GiB, 3),
                       **{k: r.get(k) for k in PART_FIELDS}, "liger": r.get("liger"), "attention": r.get("attention"),
                       "reserved_plus_context_GiB": round(r["reserved_plus_context_bytes"] / GiB, 3),
                       "fits_12GiB_card": r["fits_12GiB_card"], "load_fits": r.get("load_fits")}
    indep = ok.get("baseline-independent")
    if indep and indep.get("tokens_per_s"):
        v["baseline-independent"] = {k: indep.get(k) for k in ("tokens_per_s", "peak_alloc_gib", "peak_reserved_gib")}
    ours = (ok.get("ours-ckpt") or {}).get("tokens_per_s")
    for name in ("baseline-fair", "baseline-independent"):
        theirs = (ok.get(name) or {}).get("tokens_per_s")
        if ours and theirs:
            v[f"speedup_ours_ckpt_vs_{name}"] = round(ours / theirs, 3)
    for name, key in (("ours-liger-off", "speedup_liger_on_vs_off"), ("ours-compile", "speedup_compile_vs_not")):
        other = (ok.get(name) or {}).get("tokens_per_s")
        if ours and other:  # ours-ckpt is Liger on (where installed) and uncompiled
            v[key] = round((ours / other) if name == "ours-liger-off" else (other / ours), 3)
    if "ours-ckpt" in v:
        v["target_ours_reserved_plus_context_le_9GiB"] = v["ours-ckpt"]["reserved_plus_context_GiB"] <= 9
    pred = out.get("planner", {}).get("predictions", {})
    for name in OURS_PARTS:
        r = ok.get(name)
        if name in pred and r and r.get("peak_allocated_bytes"):
            p = pred[name]
            static = sum(sum(d.values()) for k, d in r.get("static_bytes_by_dtype", {}).items() if k in STATIC_WEIGHTS)
            v[f"planner_{name}"] = {
                "predicted_peak_GiB": round(p["peak_bytes"] / GiB, 3),
                "error_allocated": round(p["allocated_bytes"] / r["peak_allocated_bytes"] - 1, 4),
                "error_peak_vs_reserved_plus_context": round(p["peak_bytes"] / r["reserved_plus_context_bytes"] - 1, 4),
                "predicted_static_weights_bytes": p["static_weights_bytes"], "measured_static_weights_bytes": static,
                "error_static": round(p["static_weights_bytes"] / static - 1, 4) if static else None}
    return v


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu-check"))
    ap.add_argument("--budget_s", type=int, default=int(os.environ.get("GPU_CHECK_BUDGET_S", DEFAULT_BUDGET_S)))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--model_cache", default=os.environ.get("GPU_CHECK_CACHE", "/tmp/gpucheck-cache"))
    ap.add_argument("--cpu-smoke", action="store_true")
    a = ap.parse_args()
    if a.cpu_smoke and not SMOKE:  # the workers inherit these: GPU dtypes (bf16 base and compute), one thread
        os.environ.update({SMOKE_ENV: "1", "FINETUNE_CPU_PRECISION": "bf16", "OMP_NUM_THREADS": "1"})
        os.execv(sys.executable, [sys.executable, __file__, *sys.argv[1:]])
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # the parent never creates a CUDA context
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shape, seq = ("tiny", 256) if SMOKE else ("llama2-7b", 2048)
    steps, warmup = (3, 1) if SMOKE else (a.steps, a.warmup)
    out_dir, cache = Path(a.out), Path(a.model_cache)
    cache.mkdir(parents=True, exist_ok=True)
    summary = {"what": "finetune GPU check: Llama-2-7B-shape QLoRA (seq 2048 mb 1, and qlora-7b-alpaca's own settings), "
                       "11.5 GiB incl. CUDA context, ours vs HF+peft+bnb",
               "command": " ".join(["python", "bench/gpu_check.py", *sys.argv[1:]]), "smoke": SMOKE, "shape": shape,
               "seq": seq, "steps": steps, "warmup": warmup, "budget_s": a.budget_s,
               "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "hardware": hardware(), "parts": {}}
    run = Runner(BENCH / "gpu_qlora.py", out_dir / "summary.json", out_dir / "logs", a.budget_s, 300, summary)
    run.save()

    rc, wall, text = run.command("env", [sys.executable, str(BENCH / "gpu_env.py"), *(["--cpu-smoke"] * SMOKE)], 150)
    summary["env"] = {**(_json_line(text, "bnb_ok") or {"error": "no JSON from gpu_env.py"}), "rc": rc, "wall_s": wall}
    run.save()
    print(f"-- env: rc={rc} {wall}s", flush=True)
    if rc != 0:
        summary["fatal"] = "bitsandbytes cannot run NF4 here; nothing else was run"
        run.save()
        print(f"FATAL: {summary['fatal']} (see {out_dir}/logs/env.log)")
        return 4

    data = gq.synthetic_data(cache / "synthetic-text.jsonl")
    try:
        planner_part(run, shape, cache, data, seq, steps)
    except Exception as e:  # noqa: BLE001 - the measurements are worth running anyway
        summary["planner"] = {"error": f"{type(e).__name__}: {e}"[:400]}
        run.save()
    model_dir = gq.model_dir(run, shape, cache)
    base = {"model_dir": str(model_dir), "data": str(data), "seq": seq, "micro": 1, "steps": steps, "warmup": warmup}

    def worker(name: str, kind: str, spec: dict, min_s: float) -> None:
        res = run.worker(name, kind, spec, min_s=min_s)
        summary["parts"][name] = {**res, **fits(res)}
        run.save()
        print(f"-- {name}: {'ok' if res.get('ok') else res.get('error') or res.get('skipped')} "
              f"{res.get('tokens_per_s', '')} tok/s", flush=True)

    parts = variants(seq)

    def ours(name: str, min_s: float) -> None:
        why = unavailable(name)
        if why:
            summary["parts"][name] = {"ok": False, "skipped": why}
            run.save()
            print(f"-- {name}: skipped ({why})", flush=True)
            return
        v_seq, v_micro, ov = parts[name]
        worker(name, "ours", {**base, "seq": v_seq, "micro": v_micro, "overrides": ov}, min_s)

    ours("ours-ckpt", 60)  # the target: 7B QLoRA peak reserved + context <= 9 GiB
    ours("ours-recipe", 60)  # what a user of the 7B recipe runs
    worker("baseline-fair", "baseline", base, 60)
    ours("ours-liger-off", 60)  # is Liger, on by default where installed, worth it?
    ours("ours-compile", 120)  # compiling the layers costs its own time up front
    ours("ours-offload", 100)
    args = (["--shape", "tiny", "--device", "cpu", "--steps", "3"] if SMOKE else
            ["--shape", shape, "--seq", str(seq), "--mb", "1", "--steps", str(steps), "--cap-gib", "11.5"])
    if run.left() > 90:
        rc, wall, text = run.command("baseline-independent", [sys.executable, str(BENCH / "hf_qlora_baseline.py"), *args],
                                     min(240, run.left() - 5), env={**os.environ, "TMPDIR": str(cache)})
        js = _json_line(text, "system")
        summary["parts"]["baseline-independent"] = ({"ok": rc == 0 and "oom" not in js, **js, "wall_s": wall} if js else
                                                    {"ok": False, "rc": rc, "wall_s": wall,
                                                     "error": (text.strip().splitlines() or ["?"])[-1][:400]})
    else:
        summary["parts"]["baseline-independent"] = {"ok": False, "skipped": f"overall budget: {run.left():.0f}s left"}
    run.save()

    summary["verdict"] = verdict(summary)
    summary["elapsed_s"] = round(a.budget_s - run.left(), 1)
    run.save()
    print("== verdict ==")
    print(json.dumps(summary["verdict"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
