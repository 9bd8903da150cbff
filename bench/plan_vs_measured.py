"""The memory planner against measured peaks: `finetune.plan.predict` vs one real training step.

    python bench/plan_vs_measured.py                  # 8 configs of SmolLM2-135M at precision=auto
    python bench/plan_vs_measured.py --precision auto,bf16-true,32-true --out bench/results/x.json
    python bench/plan_vs_measured.py --model /path/to/hf-dir --seq 256

Each precision is resolved as training resolves it (precision=auto on a CPU: the probe's choice,
finetune.runtime.planned_precision), for the prediction and the measurement alike.

Each config builds the recipe's model, loss and optimizer as training does and measures its second
step with `finetune.training.measure.measure` (what `finetune plan ... measure=true` runs): on a GPU torch's
`max_memory_allocated`, on a CPU the profiler's running allocation total on top of the live tensors.
The prediction is the planner's for the same device, without the CUDA context and the allocator
slack (torch's allocated bytes do not include them). Writes bench/results/plan-vs-measured-<device>.json
and prints one line: the largest |error|. Target: within +-10% on >= 6 configs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from common import cpu_model, versions

ROOT = Path(__file__).resolve().parents[1]
# One axis changed at a time from the base, so a miss points at the part of the model that missed.
CONFIGS = {
    "lora": {},
    "lora-seq1024": {"data.seq_len": "1024"},
    "checkpointing": {"train.gradient_checkpointing": "true"},
    "checkpointing-seq1024": {"train.gradient_checkpointing": "true", "data.seq_len": "1024"},
    "lora-dropout": {"lora.dropout": "0.05"},
    "qlora-nf4": {"quant.mode": "nf4"},
    "plain-autograd": {"train.lean_activations": "false"},
    "full-logits": {"train.loss_chunk_size": "0"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="model.name (alias, local HF dir or hub id)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--only", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    ap.add_argument("--precision", default="auto", help="comma-separated precisions, e.g. auto,bf16-true,32-true")
    ap.add_argument("--out", default=None, help="default: bench/results/plan-vs-measured-<device>.json")
    a = ap.parse_args()

    import torch

    from finetune.config import load_config
    from finetune.training.measure import STATIC_PARTS, measure, measured_device_cfg
    from finetune.plan.predict import predict

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = {"model.name": a.model, "accelerator": device, "data.seq_len": str(a.seq),
            "train.micro_batch_size": str(a.micro_batch), "lora.r": "16", "lora.alpha": "32", "lora.dropout": "0",
            "lora.target_modules": "[all-linear]", "train.optimizer": "adamw", "train.loss_chunk_size": "256"}
    rows = []
    for precision, name in [(p, n) for p in a.precision.split(",") for n in a.only.split(",")]:
        cfg = measured_device_cfg(load_config("tiny-lora", dict(base, precision=precision, **CONFIGS[name])))
        plan = predict(cfg, slack=0.0)
        predicted = plan.peak_bytes - plan.parts["cuda_context"]
        t0 = time.perf_counter()
        m = measure(cfg)
        err = predicted / m["peak_allocated_bytes"] - 1
        rows.append({"config": name, "precision": precision, "planned_precision": cfg.precision,
                     "overrides": CONFIGS[name], "predicted_bytes": predicted,
                     "measured_bytes": m["peak_allocated_bytes"], "error": round(err, 4),
                     "static_error": round(sum(plan.parts.get(k, 0) for k in STATIC_PARTS) / m["static_bytes_total"] - 1, 4),
                     "parts": plan.parts, "measure": m, "wall_s": round(time.perf_counter() - t0, 1)})
        print(f"{name:24s} {precision:10s} predicted {predicted / 2**20:8.1f} MiB  measured {m['peak_allocated_bytes'] / 2**20:8.1f} MiB"
              f"  error {100 * err:+5.1f}%  static {100 * rows[-1]['static_error']:+.1f}%", flush=True)
    worst = max(abs(r["error"]) for r in rows)
    out = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
        "hardware": {"device": torch.cuda.get_device_name() if device == "cuda" else cpu_model(),
                     "nproc": os.cpu_count(), "platform": platform.platform()},
        "versions": versions(("torch", "transformers", "peft", "bitsandbytes")),
        "base": base, "precisions": a.precision.split(","), "rows": rows, "max_abs_error": round(worst, 4),
        "within_10_percent": sum(abs(r["error"]) <= 0.10 for r in rows),
        "max_abs_static_error": max(abs(r["static_error"]) for r in rows),
    }
    path = Path(a.out or ROOT / "bench" / "results" / f"plan-vs-measured-{device}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"plan vs measured ({device}, {a.model}, seq {a.seq}): {out['within_10_percent']}/{len(rows)} configs "
          f"within +-10%, max |error| {100 * worst:.1f}%  -> {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
