"""7B/8B QLoRA on one GPU capped to 12 GiB: our trainer vs a plain transformers+peft+bitsandbytes loop.

    python bench/gpu_qlora.py [--parts speed,longest,planner] [--steps 6] [--warmup 2] [--out bench/results/gpu-qlora.json]

Needs a CUDA GPU (exits with a message otherwise; CI never runs it). Models are random-init from
the real configs (the shapes and therefore the memory and compute are real; nothing is
downloaded): Llama-2-7B and Llama-3.1-8B, written once in bf16 to --model_cache with the byte-level
tokenizer of finetune.models.tiny. Data are synthetic text rows (byte tokens), packed to the sequence
length, so every step trains on full 2048-token sequences. Every measurement runs in its own
subprocess that first calls torch.cuda.set_per_process_memory_fraction(12 GiB / device memory),
so an over-budget configuration fails with OOM exactly as it would on a 12 GiB card.

Parts:
- speed: Llama-2-7B NF4 (double quant, bf16 compute), LoRA r=16 all-linear, seq 2048 packed,
  micro-batch 1. Ours = finetune.training.loop.main (the real loop) in two settings: the recipe default
  (gradient checkpointing + chunked loss) and activation offload without checkpointing. Baseline =
  a plain loop: from_pretrained(BitsAndBytesConfig) -> prepare_model_for_kbit_training(gradient
  checkpointing) -> get_peft_model -> model(input_ids, labels) -> backward -> paged AdamW 8-bit,
  on the same packed batches. Reports peak allocated/reserved memory and trained tokens/s
  (steps after --warmup). Targets: ours peak <= 9 GiB and >= 2x the baseline's tokens/s.
- longest: Llama-3.1-8B shape, micro-batch 1, with recipes/qlora-8b-longctx.yaml's memory settings
  (checkpointing, activation offload, MLP tiles, loss chunks of 256, LoRA dropout 0,
  flash_attention_2 when flash-attn is installed, else sdpa, which needs no mask here: one example
  per sequence): the longest seq len that trains (forward + backward + optimizer step) within
  12 GiB, trying increasing lengths in fresh processes, each with the planner's prediction. Target >= 24k.
- planner: finetune.plan.predict against the measured peak for >= 6 configs (seq len, micro-batch,
  checkpointing, offload) of the 7B; error = predicted / measured - 1, target within +-10%.

Prints one line per part and writes JSON with the command, hardware and versions. Imports nothing
GPU-only at module level.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import versions

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GiB = 1024 ** 3
BUDGET = 12 * GiB
SHAPES = {
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
LONGCTX_RECIPE = "qlora-8b-longctx"  # the part `longest` measures this recipe's memory settings
LONGCTX_KEYS = ("train.gradient_checkpointing", "train.offload_activations", "train.mlp_tile_size",
                "train.loss_chunk_size", "lora.dropout", "model.attn_implementation")
PLANNER_CONFIGS = [  # (seq_len, micro_batch, gradient_checkpointing, offload_activations)
    (512, 1, True, False), (1024, 1, True, False), (2048, 1, True, False), (4096, 1, True, False),
    (2048, 2, True, False), (1024, 1, False, False), (2048, 1, False, True), (8192, 1, True, False),
]


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
    with torch.device("cuda"):  # initialising 7B parameters on the GPU takes seconds, on CPU minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del model
    torch.cuda.empty_cache()
    os.replace(tmp, path)
    return path


def synthetic_data(path: Path, rows: int = 400, lo: int = 300, hi: int = 1800, seed: int = 0) -> Path:
    """Text rows of lo-hi bytes (= byte tokens). Short rows: packing fills 2048-token sequences;
    rows longer than the seq len: every sequence is one example, truncated (one causal block)."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "memory", "adapter", "quantized", "token", "layer", "the"]
    with path.open("w") as f:
        for _ in range(rows):
            n = rng.randint(lo, hi)
            text = " ".join(rng.choice(words) for _ in range(n // 5))[:n]
            f.write(json.dumps({"text": text}) + "\n")
    return path


def cap_memory() -> dict:
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, BUDGET / total), 0)
    torch.cuda.init()
    free, total = torch.cuda.mem_get_info()
    return {"device_total_bytes": total, "context_bytes": total - free - torch.cuda.memory_reserved()}


def ours_cfg(model_dir: Path, data: Path, seq: int, micro: int, steps: int, out_dir: Path, **extra):
    from finetune.config import load_config

    overrides = {
        "model.name": str(model_dir), "accelerator": "cuda", "out_dir": str(out_dir),
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
    from finetune.training.loss import CausalLMLoss
    from finetune.training.progress import TrainProgress

    ctx = cap_memory()
    tokens, ends = [], []
    real_forward = CausalLMLoss._forward

    load_peak = {}

    def counting_forward(self, input_ids, labels, position_ids):
        if torch.is_grad_enabled():
            if not tokens:  # the training peak, not the model-loading one
                load_peak["load_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            tokens.append(int((labels[:, 1:] != -100).sum()))
        return real_forward(self, input_ids, labels, position_ids)

    def step_end(self, step, loss, lr, tok_s):
        torch.cuda.synchronize()
        ends.append(time.perf_counter())

    CausalLMLoss._forward = counting_forward
    TrainProgress.update = step_end
    with tempfile.TemporaryDirectory() as tmp:
        cfg, overrides = ours_cfg(Path(spec["model_dir"]), Path(spec["data"]), spec["seq"], spec["micro"],
                                  spec["steps"], Path(tmp) / "run", **spec.get("overrides", {}))
        loop.main(loop.make_fabric(cfg), cfg)
    return {**ctx, **_timing(tokens, ends, spec["warmup"]), **_peaks(), **load_peak}


def worker_baseline(spec: dict) -> dict:
    """The plain loop most QLoRA scripts use: HF loss on full logits, gradient checkpointing."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from finetune.data import BatchStream, prepare
    from finetune.models.load import load_tokenizer

    ctx = cap_memory()
    with tempfile.TemporaryDirectory() as tmp:
        cfg, _ = ours_cfg(Path(spec["model_dir"]), Path(spec["data"]), spec["seq"], spec["micro"], spec["steps"],
                          Path(tmp) / "run")
    tok = load_tokenizer(cfg.model)
    units = prepare(cfg.data, tok, seed=0, progress=False).train
    stream = BatchStream(units, global_batch_size=spec["micro"], micro_batch_size=spec["micro"], world_size=1, rank=0,
                         seed=0, group_by_length=False, pad_id=tok.pad_token_id)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    opt = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    tokens, ends = [], []
    for step in range(spec["steps"]):
        for b in stream.step_batches(step):
            b = {k: v.cuda() for k, v in b.items()}
            out = model(input_ids=b["input_ids"], labels=b["labels"], position_ids=b["position_ids"])
            out.loss.backward()
            tokens.append(int((b["labels"][:, 1:] != -100).sum()))
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        ends.append(time.perf_counter())
    return {**ctx, **_timing(tokens, ends, spec["warmup"]), **_peaks()}


def _timing(tokens: list, ends: list, warmup: int) -> dict:
    if len(ends) <= warmup:
        return {"steps": len(ends)}
    dt = ends[-1] - ends[warmup - 1] if warmup else None
    n = sum(tokens[warmup:len(ends)])
    return {"steps": len(ends), "measured_s": round(dt, 3), "trained_tokens": n, "tokens_per_s": round(n / dt, 1)}


def _peaks() -> dict:
    import torch

    return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved()}


def run_worker(kind: str, spec: dict, timeout: int) -> dict:
    """One measurement in a fresh process; OOM (or any failure) comes back as ok=False."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        spec_path = f.name
    cmd = [sys.executable, __file__, "--worker", kind, "--spec", spec_path]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timeout after {timeout}s"}
    finally:
        wall = time.perf_counter() - t0
    result_path = Path(spec_path + ".result")
    if proc.returncode == 0 and result_path.is_file():
        res = {"ok": True, **json.loads(result_path.read_text()), "wall_s": round(wall, 1)}
        result_path.unlink()
        return res
    text = proc.stderr + proc.stdout
    oom = "OutOfMemoryError" in text or "out of memory" in text.lower()
    last = [line for line in text.strip().splitlines() if line.strip()][-1:] or ["?"]
    return {"ok": False, "oom": oom, "error": last[0][:300], "wall_s": round(wall, 1)}


# --------------------------------------------------------------------------- parts


def part_speed(a, model_dir: Path, data: Path) -> dict:
    base = {"model_dir": str(model_dir), "data": str(data), "seq": 2048, "micro": 1, "steps": a.steps,
            "warmup": a.warmup}
    runs = {"baseline-hf-peft-bnb-ckpt": run_worker("baseline", base, a.timeout)}
    for name, ov in OURS_VARIANTS.items():
        runs[name] = run_worker("ours", {**base, "overrides": ov}, a.timeout)
    ok = {k: v for k, v in runs.items() if v.get("ok") and "tokens_per_s" in v}
    ours_ok = {k: v for k, v in ok.items() if k.startswith("ours") and v["peak_reserved_bytes"] <= 9 * GiB}
    summary = {}
    if ours_ok and "baseline-hf-peft-bnb-ckpt" in ok:
        best = max(ours_ok, key=lambda k: ours_ok[k]["tokens_per_s"])
        summary = {"best_ours": best, "speedup_vs_baseline": round(
            ok[best]["tokens_per_s"] / ok["baseline-hf-peft-bnb-ckpt"]["tokens_per_s"], 3)}
    for k, v in runs.items():
        if v.get("ok"):
            print(f"  speed {k:26s} {v.get('tokens_per_s', 0):8.1f} tok/s  peak alloc "
                  f"{v['peak_allocated_bytes'] / GiB:5.2f} GiB  reserved {v['peak_reserved_bytes'] / GiB:5.2f} GiB")
        else:
            print(f"  speed {k:26s} failed: {v.get('error')}")
    return {"runs": runs, **summary, "targets": {"peak_GiB": 9, "speedup_vs_baseline": 2.0}}


def longctx_overrides() -> dict:
    """The long-context recipe's memory settings as overrides (sdpa where flash-attn is missing)."""
    import importlib.util

    from finetune.config import load_config, to_dict

    recipe = to_dict(load_config(LONGCTX_RECIPE, {}))
    out = {key: str(recipe[key.split(".")[0]][key.split(".")[1]]) for key in LONGCTX_KEYS}
    if out["model.attn_implementation"] == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        out["model.attn_implementation"] = "sdpa"
    return out


def part_longest(a, model_dir: Path, data: Path) -> dict:
    from finetune.plan import predict as plan

    tried = {}
    longest = 0
    overrides = longctx_overrides()
    for seq in a.seq_lens:
        res = run_worker("ours", {"model_dir": str(model_dir), "data": str(data), "seq": seq, "micro": 1,
                                  "steps": 2, "warmup": 1, "overrides": overrides}, a.timeout)
        cfg, _ = ours_cfg(model_dir, data, seq, 1, 2, Path("unused"), **overrides)
        res["predicted_peak_bytes"] = plan.predict(cfg, 1, seq).peak_bytes
        tried[seq] = res
        outcome = (f"ok, peak reserved {res['peak_reserved_bytes'] / GiB:.2f} GiB" if res.get("ok")
                   else f"failed: {res.get('error')}")
        print(f"  longest llama-3.1-8b seq {seq:6d} (predicted {res['predicted_peak_bytes'] / GiB:.2f} GiB): {outcome}")
        if not res.get("ok"):
            break
        longest = seq
    return {"longest_seq_len": longest, "overrides": overrides, "tried": tried, "target": 24576}


def part_planner(a, model_dir: Path, data: Path) -> dict:
    from finetune.plan import predict as plan

    rows = []
    for seq, micro, ckpt, offload in PLANNER_CONFIGS:
        ov = {"train.gradient_checkpointing": str(ckpt).lower(), "train.offload_activations": str(offload).lower()}
        res = run_worker("ours", {"model_dir": str(model_dir), "data": str(data), "seq": seq, "micro": micro,
                                  "steps": 2, "warmup": 1, "overrides": ov}, a.timeout)
        cfg, _ = ours_cfg(model_dir, data, seq, micro, 2, Path("unused"), **ov)  # shape from its config.json
        p = plan.predict(cfg, micro, seq)
        predicted = p.peak_bytes
        predicted_alloc = predicted - p.parts.get("cuda_context", 0) - p.parts.get("allocator_slack", 0)
        row = {"seq_len": seq, "micro_batch": micro, "gradient_checkpointing": ckpt, "offload": offload,
               "predicted_peak_bytes": predicted, "predicted_allocated_bytes": predicted_alloc, "measured": res}
        if res.get("ok"):
            measured = res["peak_reserved_bytes"] + res["context_bytes"]
            row["measured_peak_bytes"] = measured
            row["error"] = round(predicted / measured - 1, 4)
            row["error_allocated"] = round(predicted_alloc / res["peak_allocated_bytes"] - 1, 4)
            print(f"  planner seq {seq:5d} mb {micro} ckpt {ckpt!s:5} offload {offload!s:5}: predicted "
                  f"{predicted / GiB:5.2f} GiB, measured {measured / GiB:5.2f} GiB ({row['error']:+.1%})")
        else:
            print(f"  planner seq {seq:5d} mb {micro} ckpt {ckpt} offload {offload}: {res.get('error')}")
        rows.append(row)
    errors = [abs(r["error"]) for r in rows if "error" in r]
    return {"configs": rows, "max_abs_error": max(errors) if errors else None,
            "within_10_percent": sum(e <= 0.10 for e in errors), "measured_configs": len(errors), "target": 0.10}


# --------------------------------------------------------------------------- driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="speed,longest,planner")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per speed run")
    ap.add_argument("--warmup", type=int, default=2, help="first steps excluded from the timing")
    ap.add_argument("--seq_lens", type=lambda s: [int(x) for x in s.split(",")],
                    default=[4096, 8192, 12288, 16384, 24576, 28672, 32768], help="lengths tried for the 8B, ascending")
    ap.add_argument("--model_cache", default=os.path.join(tempfile.gettempdir(), "finetune-bench-models"))
    ap.add_argument("--timeout", type=int, default=900, help="seconds per measurement process")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu-qlora.json"))
    ap.add_argument("--worker", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker:
        spec = json.loads(Path(a.spec).read_text())
        res = {"ours": worker_ours, "baseline": worker_baseline}[a.worker](spec)
        Path(a.spec + ".result").write_text(json.dumps(res))
        return

    import torch  # the CPU build is fine here; only the check below decides

    if not torch.cuda.is_available():
        sys.exit("gpu_qlora: no CUDA GPU visible; this benchmark needs one (run it on a GPU machine)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = Path(a.model_cache)
    cache.mkdir(parents=True, exist_ok=True)
    data = synthetic_data(cache / "synthetic-text.jsonl")
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    out = {"what": "QLoRA peak GPU memory and tokens/s under a 12 GiB cap, random-init real shapes",
           "command": "python " + " ".join([Path(sys.argv[0]).resolve().relative_to(REPO).as_posix(), *sys.argv[1:]]),
           "hardware": {"gpu": torch.cuda.get_device_name(0),
                        "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory,
                        "cap_bytes": BUDGET, "cpu_count": os.cpu_count(), "platform": platform.platform()},
           "versions": versions(("torch", "transformers", "peft", "bitsandbytes", "lightning")), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if "speed" in parts or "planner" in parts:
        llama2 = random_model_dir("llama2-7b", cache)
    if "speed" in parts:
        out["speed"] = part_speed(a, llama2, data)
    if "longest" in parts:  # one long example per sequence, so attention really spans seq_len
        long_rows = synthetic_data(cache / "synthetic-long.jsonl", rows=6, lo=max(a.seq_lens) + 1024,
                                   hi=max(a.seq_lens) + 1024)
        out["longest"] = part_longest(a, random_model_dir("llama31-8b", cache), long_rows)
    if "planner" in parts:
        out["planner"] = part_planner(a, llama2, data)

    line = ["gpu_qlora:"]
    if "speed" in out:
        s = out["speed"]
        line.append(f"speedup_vs_baseline {s.get('speedup_vs_baseline')} ({s.get('best_ours')})")
    if "longest" in out:
        line.append(f"longest 8B seq {out['longest']['longest_seq_len']}")
    if "planner" in out:
        line.append(f"planner max |error| {out['planner']['max_abs_error']}")
    print(" | ".join(line))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
