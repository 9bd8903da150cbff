"""7B/8B QLoRA on one GPU capped to 12 GiB: our trainer vs a fair transformers+peft+bitsandbytes loop.

    python bench/gpu_qlora.py [--parts speed,best,longest,planner] [--steps 6] [--warmup 2] [--budget_s 3000]
                              [--best_start 8] [--out bench/results/gpu-qlora.json] [--logs DIR] [--cpu-smoke]

Needs a CUDA GPU, except with --cpu-smoke: every code path on a tiny shape on the CPU (bf16
compute, no memory cap; its numbers mean nothing). Models are random-init from the real configs (the shapes and therefore the memory
and compute are real; nothing is downloaded): Llama-2-7B and Llama-3.1-8B, written once in bf16 to
--model_cache with the byte-level tokenizer of finetune.models.tiny. Data are synthetic text rows
(byte tokens). Every measurement runs in its own subprocess that first calls
torch.cuda.set_per_process_memory_fraction(12 GiB / device memory), so an over-budget
configuration fails with OOM as it would on a 12 GiB card; the parent never initialises CUDA,
so a worker's context is its own. "fits a 12 GB card" = peak reserved + that process's memory
outside torch's allocator (CUDA context, cuBLAS workspaces, bitsandbytes' pages) <= 11.5 GiB (a
12 GB card shows torch about 11.7 GiB); each worker is capped to 11.5 GiB less its measured
context, and records its load-time peak apart from the training peak (the cache emptied between).

Parts (the JSON is rewritten the moment each part, and each worker, ends; every worker's whole
output goes to --logs; --budget_s bounds the whole run, every worker's timeout included):
- speed: Llama-2-7B NF4 (double quant, bf16 compute), LoRA r=16 all-linear, seq 2048 packed,
  micro-batch 1. Ours = finetune.training.loop.main (the real loop) in two settings: the recipe
  default (gradient checkpointing + chunked loss) and activation offload without checkpointing.
  Baseline = what HF Trainer/TRL users run: from_pretrained(BitsAndBytesConfig) ->
  prepare_model_for_kbit_training(non-reentrant gradient checkpointing) -> get_peft_model ->
  model(input_ids, labels) under bf16 autocast -> backward -> paged AdamW 8-bit, on the very
  batches ours trains on (same data pipeline, same seed). Reports peak allocated/reserved memory
  and trained tokens/s (steps after --warmup; 0 times from the first forward). Targets: ours
  reserved + context <= 9 GiB and >= 2x the baseline's tokens/s.
- best: the same 7B, each trainer at its largest micro-batch within 11.5 GiB: ours at
  train.micro_batch_size=auto (the planner's), the baseline by a measured search halving on OOM
  from --best_start (bench/gpu_parts.py, with `longest` and `planner`).
- longest: Llama-3.1-8B shape, micro-batch 1, with recipes/qlora-8b-longctx.yaml's memory settings
  (checkpointing, activation offload, MLP tiles, loss chunks of 256, LoRA dropout 0,
  flash_attention_2 when flash-attn is installed, else sdpa), one example per sequence
  (data.packing=false, the rows are longer than any length tried), planned with those same
  settings: the longest seq len that trains (forward + backward + optimizer step) within 12 GiB,
  trying increasing lengths in fresh processes. Target >= 32k.
- planner: finetune.plan.predict against the measured peak for 8 configs (seq len, micro-batch,
  checkpointing, offload) of the 7B; error = predicted / measured - 1, target within +-10%.

Records the command, GPU, driver, CUDA, flash-attn and package versions. Imports nothing
GPU-only at module level; bench/gpu_check.sh runs these workers as the one-call device check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import versions
from gpu_runner import BUDGET, LIMIT, SMOKE, SMOKE_ENV, Runner, fits, hardware, synthetic_data  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GiB = 1024 ** 3
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096, rope_theta=10000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False),
    # The published configs' shape fields (random init: nothing else matters for memory/speed).
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama31-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=False),
}
# Our loop's settings for each measured variant (training-config overrides).
OURS_VARIANTS = {
    "ours-ckpt": {"train.gradient_checkpointing": "true", "train.offload_activations": "false"},
    "ours-offload": {"train.gradient_checkpointing": "false", "train.offload_activations": "true"},
}


# --------------------------------------------------------------------------- helpers


def random_model_dir(shape: str, cache: Path) -> Path:
    """A bf16 random-init checkpoint with the real config and the byte tokenizer (written once)."""
    path = cache / f"random-{shape}"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from finetune.models.tiny import byte_tokenizer

    fields = SHAPES[shape]
    tok = byte_tokenizer()
    config = LlamaConfig(**fields, pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=tok.eos_token_id)
    tmp = path.with_name(path.name + ".tmp")
    torch.manual_seed(0)
    with torch.device("cpu" if SMOKE else "cuda"):  # 7B parameters: seconds on the GPU, minutes on a CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del model
    if not SMOKE:
        torch.cuda.empty_cache()
    os.replace(tmp, path)
    return path


def _own_gpu_bytes(spec: dict) -> int:
    """Device memory this process holds (the CUDA context included): NVML's per-process figure
    where pynvml is importable, else all used memory less what the parent saw used before it
    started this worker (spec["others_used_bytes"])."""
    import torch

    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory:
                return int(proc.usedGpuMemory)
    except Exception:  # noqa: BLE001 - no NVML (or no per-process accounting in a container)
        pass
    free, total = torch.cuda.mem_get_info()
    return total - free - int(spec.get("others_used_bytes") or 0)


def cap_memory(spec: dict) -> dict:
    """Cap this process to LIMIT (11.5 GiB) less its own CUDA context, measured first: torch's cap
    covers only its allocator, the context comes on top on a real card."""
    if SMOKE:
        return {"context_bytes": 0, "cap_bytes": LIMIT}
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.init()
    torch.zeros(1, device="cuda")  # the context exists from here on
    context = _own_gpu_bytes(spec) - torch.cuda.memory_reserved()
    cap = LIMIT - max(context, 0)
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), 0)
    return {"device_total_bytes": total, "context_bytes": context, "cap_bytes": cap}


def end_of_load() -> dict:
    """Between loading and the first step: the load-time peaks, then the cache emptied and the
    peaks reset, so the training peak is the steps' own (cached load blocks would count in it)."""
    if SMOKE:
        return {"load_peak_allocated_bytes": 0, "load_peak_reserved_bytes": 0}
    import torch

    _sync()
    out = {"load_peak_allocated_bytes": torch.cuda.max_memory_allocated(),
           "load_peak_reserved_bytes": torch.cuda.max_memory_reserved()}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return out


def _end_memory(spec: dict) -> dict:
    """Peaks, and what the process holds outside torch's allocator at the end (the context grows:
    cuBLAS workspaces, kernels loaded on first use, bitsandbytes' managed pages if resident)."""
    if SMOKE:
        return {"peak_allocated_bytes": 0, "peak_reserved_bytes": 0, "end_non_torch_bytes": 0}
    import torch

    torch.cuda.synchronize()
    st = torch.cuda.memory_stats()
    return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
            "end_non_torch_bytes": _own_gpu_bytes(spec) - torch.cuda.memory_reserved(),
            "num_alloc_retries": st.get("num_alloc_retries"), "num_ooms": st.get("num_ooms")}


def _sync() -> None:
    if not SMOKE:
        import torch

        torch.cuda.synchronize()


def _dtypes(model) -> dict:
    from finetune.training.measure import static_bytes

    return static_bytes(model)


def ours_cfg(model_dir: Path, data: Path, seq: int, micro: int, steps: int, out_dir: Path, **extra):
    from finetune.config import load_config

    overrides = {
        "model.name": str(model_dir), "accelerator": "cpu" if SMOKE else "cuda", "out_dir": str(out_dir),
        "data.path": str(data), "data.format": "text", "data.seq_len": str(seq), "data.packing": "true",
        "data.val_fraction": "0.0", "data.cache": "false",
        "quant.mode": "nf4", "quant.double_quant": "true", "quant.compute_dtype": "bfloat16",
        "lora.r": "16", "lora.alpha": "32", "lora.dropout": "0.0", "lora.target_modules": "[all-linear]",
        "train.max_steps": str(steps), "train.micro_batch_size": str(micro), "train.global_batch_size": str(micro),
        "train.optimizer": "paged_adamw_8bit", "train.loss_chunk_size": "1024", "train.warmup_steps": "1",
        "train.eval_batches": "0", "output.progress": "false", "output.plot": "false",
        **extra,
    }
    return load_config(None, overrides), overrides


# --------------------------------------------------------------------------- workers (fresh process each)


def worker_ours(spec: dict) -> dict:
    """Our real training loop; step ends and trained tokens recorded from inside it."""
    # Imported in the worker, not at the top: each worker process measures its own trainer's GPU
    # memory, so it must not load the other trainer's libraries.
    import torch

    from finetune.training import loop
    from finetune.training.objectives.sft import CausalLMLoss
    from finetune.training.progress import TrainProgress

    ctx = cap_memory(spec)
    tokens, ends, start, marks = [], [], [], []
    real_forward, real_build = CausalLMLoss._forward, loop.build_step
    extra = {}

    def counting_forward(self, input_ids, labels, position_ids):
        if torch.is_grad_enabled():
            if not tokens:  # the training peak, not the model-loading one
                extra.update(end_of_load())
                start.append(time.perf_counter())
            tokens.append(int((labels[:, 1:] != -100).sum()))
        return real_forward(self, input_ids, labels, position_ids)

    def step_end(self, step, loss, lr, tok_s):
        _sync()
        ends.append(time.perf_counter())
        marks.append(len(tokens))  # micro-batches so far: a step accumulates several under auto
        extra.setdefault("losses", []).append(round(float(loss), 4))

    def build_step(cfg, device, tokenizer):  # which tensors hold which dtype, as loaded
        step = real_build(cfg, device, tokenizer)
        extra["static_bytes_by_dtype"] = _dtypes(step.model)
        base = step.model.get_base_model() if hasattr(step.model, "get_base_model") else step.model
        extra.update(liger=step.memory.liger, attention=base.config._attn_implementation)  # what auto chose
        if not SMOKE:
            extra["after_load_allocated_bytes"] = torch.cuda.memory_allocated()
        return step

    def micro_batch(cfg, device):  # what train.micro_batch_size=auto picked (bench/gpu_parts.py's best)
        extra["micro_batch"] = real_micro(cfg, device)
        return extra["micro_batch"]

    real_micro = loop.report.micro_batch
    CausalLMLoss._forward, TrainProgress.update, loop.build_step = counting_forward, step_end, build_step
    loop.report.micro_batch = micro_batch
    with tempfile.TemporaryDirectory() as tmp:
        cfg, overrides = ours_cfg(Path(spec["model_dir"]), Path(spec["data"]), spec["seq"], spec["micro"],
                                  spec["steps"], Path(tmp) / "run", **spec.get("overrides", {}))
        loop.main(loop.make_fabric(cfg), cfg)
    return {**ctx, **_timing(tokens, ends, start, spec["warmup"], marks), **_end_memory(spec), **extra}


def worker_build(spec: dict) -> dict:
    """random_model_dir in a worker: building on the GPU would leave a CUDA context in the parent."""
    path = random_model_dir(spec["shape"], Path(spec["cache"]))
    return {"model_dir": str(path), "bytes": sum(f.stat().st_size for f in path.glob("*.safetensors"))}


def model_dir(run: Runner, shape: str, cache: Path) -> Path:
    res = run.worker(f"build-{shape}", "build", {"shape": shape, "cache": str(cache)}, min_s=10)
    run.out.setdefault("builds", {})[shape] = res
    run.save()
    if not res.get("ok"):
        raise SystemExit(f"gpu_qlora: building the random {shape} failed: {res.get('error') or res.get('skipped')}")
    return Path(res["model_dir"])


def worker_baseline(spec: dict) -> dict:
    """What HF Trainer / TRL users run: bf16 autocast, non-reentrant checkpointing, HF loss on full
    logits, paged AdamW 8-bit; on the batches our loop trains on (same pipeline, same seed)."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from finetune.data.pipeline import prepare
    from finetune.data.stream import BatchStream
    from finetune.models.load import load_tokenizer

    ctx = cap_memory(spec)
    device = "cpu" if SMOKE else "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        cfg, _ = ours_cfg(Path(spec["model_dir"]), Path(spec["data"]), spec["seq"], spec["micro"], spec["steps"],
                          Path(tmp) / "run", **spec.get("overrides", {}))
    tok = load_tokenizer(cfg.model)
    units = prepare(cfg.data, tok, seed=cfg.train.seed, progress=False).train
    stream = BatchStream(units, global_batch_size=spec["micro"], micro_batch_size=spec["micro"], world_size=1, rank=0,
                         seed=cfg.train.seed, group_by_length=not cfg.data.packing, pad_id=tok.pad_token_id)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": "cpu" if SMOKE else 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    opt = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    extra = {"static_bytes_by_dtype": _dtypes(model), "losses": [], **end_of_load()}
    model.train()
    tokens, ends, start = [], [], []
    for step in range(spec["steps"]):
        for b in stream.step_batches(step):
            b = {k: v.to(device) for k, v in b.items()}
            if not start:
                _sync()
                start.append(time.perf_counter())
            with torch.autocast(device, dtype=torch.bfloat16):
                out = model(input_ids=b["input_ids"], labels=b["labels"], position_ids=b["position_ids"])
            out.loss.backward()
            tokens.append(int((b["labels"][:, 1:] != -100).sum()))
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        ends.append(time.perf_counter())
        extra["losses"].append(round(float(out.loss.detach()), 4))
    return {**ctx, **_timing(tokens, ends, start, spec["warmup"]), **_end_memory(spec), **extra}


def _timing(tokens: list, ends: list, start: list, warmup: int, marks=None) -> dict:
    """Trained tokens/s over the steps after `warmup` (warmup 0: from the first forward); `marks`:
    micro-batches done at each step's end (default one per step)."""
    if len(ends) <= warmup or (not warmup and not start):
        return {"steps": len(ends)}
    dt = ends[-1] - (ends[warmup - 1] if warmup else start[0])
    marks = marks or list(range(1, len(ends) + 1))
    n = sum(tokens[marks[warmup - 1] if warmup else 0:marks[len(ends) - 1]])
    return {"steps": len(ends), "measured_s": round(dt, 3), "trained_tokens": n, "tokens_per_s": round(n / dt, 1)}


# --------------------------------------------------------------------------- parts


BASELINE = "baseline-hf-peft-bnb-fair"


def part_speed(a, run: Runner, model_dir: Path, data: Path, seq: int = 2048) -> dict:
    base = {"model_dir": str(model_dir), "data": str(data), "seq": seq, "micro": 1, "steps": a.steps,
            "warmup": a.warmup}
    part = run.out.setdefault("speed", {"runs": {}, "targets": {"reserved_plus_context_GiB": 9,
                                                                "speedup_vs_baseline": 2.0}})
    todo = [(name, "ours", {**base, "overrides": ov}) for name, ov in OURS_VARIANTS.items()]
    todo.insert(1, (BASELINE, "baseline", base))
    for name, kind, spec in todo:
        res = run.worker(name, kind, spec)
        part["runs"][name] = {**res, **fits(res)}
        run.save()
        if res.get("ok"):
            print(f"  speed {name:26s} {res.get('tokens_per_s', 0):8.1f} tok/s  peak alloc "
                  f"{res['peak_allocated_bytes'] / GiB:5.2f} GiB  reserved+context "
                  f"{part['runs'][name]['reserved_plus_context_bytes'] / GiB:5.2f} GiB", flush=True)
        else:
            print(f"  speed {name:26s} failed: {res.get('error') or res.get('skipped')}", flush=True)
    runs = part["runs"]
    ok = {k: v for k, v in runs.items() if v.get("ok") and "tokens_per_s" in v}
    ours_ok = {k: v for k, v in ok.items() if k.startswith("ours") and v["reserved_plus_context_bytes"] <= 9 * GiB}
    if ours_ok and BASELINE in ok:
        best = max(ours_ok, key=lambda k: ours_ok[k]["tokens_per_s"])
        part.update(best_ours=best, speedup_vs_baseline=round(ok[best]["tokens_per_s"] / ok[BASELINE]["tokens_per_s"], 3))
    run.save()
    return part


# --------------------------------------------------------------------------- driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="speed,best,longest,planner")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per speed run")
    ap.add_argument("--warmup", type=int, default=2, help="first steps excluded from the timing (0: none)")
    ap.add_argument("--seq_lens", type=lambda s: [int(x) for x in s.split(",")],
                    default=[8192, 16384, 24576, 32768, 40960, 49152], help="lengths tried for the 8B, ascending")
    ap.add_argument("--best_start", type=int, default=8, help="best: the baseline's first micro-batch (halved on OOM)")
    ap.add_argument("--model_cache", default=os.path.join(tempfile.gettempdir(), "finetune-bench-models"))
    ap.add_argument("--timeout", type=int, default=600, help="seconds per measurement process at most")
    ap.add_argument("--budget_s", type=int, default=3000, help="seconds for the whole run, workers included")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu-qlora.json"))
    ap.add_argument("--logs", help="directory for every worker's whole output (default: next to --out)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shape on the CPU: rehearse every path")
    ap.add_argument("--worker", choices=["ours", "baseline", "build"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker:
        spec = json.loads(Path(a.spec).read_text())
        res = {"ours": worker_ours, "baseline": worker_baseline, "build": worker_build}[a.worker](spec)
        Path(a.spec + ".result").write_text(json.dumps(res))
        return
    if a.warmup < 0 or a.warmup >= a.steps:
        sys.exit("gpu_qlora: need 0 <= --warmup < --steps")
    if a.cpu_smoke:  # the workers inherit these: GPU dtypes (bf16 base and compute), one thread
        os.environ.update({SMOKE_ENV: "1", "FINETUNE_CPU_PRECISION": "bf16", "OMP_NUM_THREADS": "1"})
        os.execv(sys.executable, [sys.executable, __file__, *[x for x in sys.argv[1:] if x != "--cpu-smoke"]])
    # The CUDA check through NVML: the parent must not create a context (a worker would count it).
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    if not SMOKE and not torch.cuda.is_available():
        sys.exit("gpu_qlora: no CUDA GPU visible; this benchmark needs one (or --cpu-smoke)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = Path(a.model_cache)
    cache.mkdir(parents=True, exist_ok=True)
    data = synthetic_data(cache / "synthetic-text.jsonl")
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    out = {"what": "QLoRA peak GPU memory and tokens/s under a 12 GiB cap, random-init real shapes",
           "command": "python " + " ".join([Path(sys.argv[0]).resolve().relative_to(REPO).as_posix(), *sys.argv[1:]]),
           "smoke": SMOKE, "hardware": hardware(),
           "versions": versions(("torch", "transformers", "peft", "bitsandbytes", "lightning", "flash-attn",
                                 "liger-kernel", "triton")),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out_path = Path(a.out)
    run = Runner(Path(__file__), out_path,
                 Path(a.logs) if a.logs else out_path.with_suffix("").with_name(out_path.stem + "-logs"),
                 a.budget_s, a.timeout, out)
    run.save()
    seven, eight = ("tiny", "tiny") if SMOKE else ("llama2-7b", "llama31-8b")
    from gpu_parts import part_best, part_longest, part_planner
    if "speed" in parts:
        part_speed(a, run, model_dir(run, seven, cache), data, 256 if SMOKE else 2048)
    if "best" in parts:
        part_best(a, run, model_dir(run, seven, cache), data, 256 if SMOKE else 2048)
    if "longest" in parts:  # one long example per sequence, so attention really spans seq_len
        long_rows = synthetic_data(cache / "synthetic-long.jsonl", rows=6, lo=max(a.seq_lens) + 1024,
                                   hi=max(a.seq_lens) + 1024)
        part_longest(a, run, model_dir(run, eight, cache), long_rows)
    if "planner" in parts:
        part_planner(a, run, model_dir(run, seven, cache), data,
                     [(256, 1, True, False), (128, 1, False, True)] if SMOKE else None)

    line = ["gpu_qlora:"]
    if "speed" in out:
        line.append(f"speedup_vs_baseline {out['speed'].get('speedup_vs_baseline')} ({out['speed'].get('best_ours')})")
    if "best" in out:
        line.append(f"best speedup_vs_baseline {out['best'].get('speedup_vs_baseline')}")
    if "longest" in out:
        line.append(f"longest 8B seq {out['longest']['longest_seq_len']}")
    if "planner" in out:
        line.append(f"planner max |error| {out['planner']['max_abs_error']}")
    out["elapsed_s"] = round(a.budget_s - run.left(), 1)
    run.save()
    print(" | ".join(line))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
