"""MLP tiles on the CPU: peak memory of one training step, untiled vs tiled, and the planner's
prediction of both.

    python bench/tiled_mlp_cpu.py [--seq 8192] [--tiles 0,2048,512] [--out bench/results/tiled_mlp_cpu.json]

A random-init Llama with Llama-3.1-8B's proportions scaled down (hidden 256, MLP 896 = 3.5x, 8 heads,
2 k/v heads, 2 layers), LoRA r=16 all-linear, dropout 0, gradient checkpointing, loss chunks of 256,
fp32, one unpacked seq-long sequence (no mask: the tiles, not the T x T mask, are what is measured).
`finetune.training.measure.measure` (what `finetune plan ... measure=true` runs) builds it as training does
and measures its second step: the live tensors plus the profiler's peak allocation total. The
planner's counterpart is its prediction for accelerator=cpu without slack. Prints one line per tile
size and writes JSON. The tiles change where memory goes on a GPU the same way; only the GPU bench
measures that.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_model, versions

SHAPE = dict(hidden_size=256, intermediate_size=896, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=32768, rope_theta=500000.0)


def row(path: Path, seq: int, tile: int) -> dict:
    from finetune.config import load_config
    from finetune.training.measure import measure
    from finetune.plan.predict import predict

    cfg = load_config(None, {
        "model.name": str(path), "accelerator": "cpu", "data.seq_len": str(seq), "data.packing": "false",
        "lora.r": "16", "lora.alpha": "32", "lora.dropout": "0.0", "lora.target_modules": "[all-linear]",
        "train.optimizer": "adamw", "train.gradient_checkpointing": "true", "train.loss_chunk_size": "256",
        "train.mlp_tile_size": str(tile), "train.micro_batch_size": "1"})
    m = measure(cfg)
    p = predict(cfg, slack=0.0)
    return {"tile": tile, "measured_peak_bytes": m["peak_allocated_bytes"], "predicted_bytes": p.peak_bytes,
            "error": round(p.peak_bytes / m["peak_allocated_bytes"] - 1, 4), "step_s_profiled": m["step_seconds"],
            "planner_parts": {k: v for k, v in p.parts.items() if v}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--tiles", type=lambda s: [int(x) for x in s.split(",")], default=[0, 2048, 512])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "tiled_mlp_cpu.json"))
    a = ap.parse_args()
    from finetune.models.tiny import make_tiny_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model(Path(tmp) / "model", **SHAPE)
        for tile in a.tiles:
            r = row(path, a.seq, tile)
            rows.append(r)
            print(f"tile {tile:5d}: measured peak {r['measured_peak_bytes'] / 2**20:8.1f} MiB, planner "
                  f"{r['predicted_bytes'] / 2**20:8.1f} MiB ({100 * r['error']:+.1f}%), "
                  f"step {r['step_s_profiled']} s under the profiler", flush=True)
    out = {"what": "peak CPU bytes of one training step (model, LoRA, optimizer state, activations), MLP tiles vs none",
           "command": "python " + " ".join(["bench/tiled_mlp_cpu.py", *sys.argv[1:]]),
           "shape": SHAPE, "seq_len": a.seq, "rows": rows,
           "hardware": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "load": os.getloadavg()},
           "versions": versions(("torch", "transformers", "peft")),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
