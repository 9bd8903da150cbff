"""What QLoRA runs fit N x 12 GiB GPUs with FSDP, per `finetune plan` (a prediction, not a measurement).

    python bench/plan_table.py [--gpu_memory 12GiB] [--out bench/results/plan_table.json]

Prints one line per (model, devices) and writes the table as JSON with the command and versions.
Every row is the qlora-7b-alpaca recipe (NF4 + double quant, r=16 all-linear, checkpointing,
chunked loss, paged 8-bit AdamW) with the model, device count and micro-batch 1 swapped in.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.config import load_config  # noqa: E402
from finetune.plan.fit import max_seq_len  # noqa: E402
from finetune.plan.predict import GiB, parse_bytes, predict  # noqa: E402

MODELS = {
    "13B": "meta-llama/Llama-2-13b-hf",
    "34B": "codellama/CodeLlama-34b-hf",
    "70B": "meta-llama/Llama-2-70b-hf",
    "70B (Llama-3.1)": "meta-llama/Llama-3.1-70B",
}
DEVICES = (1, 2, 4, 8)
SEQ_LENS = (1024, 2048)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu_memory", default="12GiB")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "plan_table.json"))
    a = ap.parse_args()
    budget = parse_bytes(a.gpu_memory)
    rows = []
    print(f"{'model':<16} {'GPUs':>4} " + " ".join(f"{'peak@' + str(s):>10}" for s in SEQ_LENS)
          + f" {'max seq':>8}  fits@{SEQ_LENS[0]}")
    for label, name in MODELS.items():
        for n in DEVICES:
            cfg = load_config("qlora-7b-alpaca", {
                "model.name": name, "devices": str(n), "strategy": "fsdp" if n > 1 else "auto",
                "train.micro_batch_size": "1",
                # what strategy=fsdp requires (finetune.training.distributed); one GPU keeps the recipe's 8-bit
                "train.optimizer": "adamw" if n > 1 else "paged_adamw_8bit"})
            peaks = {s: predict(cfg, 1, s).peak_bytes for s in SEQ_LENS}
            longest = max_seq_len(cfg, budget, micro_batch=1)
            rows.append({"model": label, "name": name, "devices": n, "strategy": "fsdp" if n > 1 else "single",
                         "micro_batch": 1, "peak_bytes_per_gpu": {str(s): p for s, p in peaks.items()},
                         "fits": {str(s): p <= budget for s, p in peaks.items()}, "max_seq_len": longest})
            print(f"{label:<16} {n:>4} " + " ".join(f"{peaks[s] / GiB:>9.2f}G" for s in SEQ_LENS)
                  + f" {longest:>8}  {'yes' if peaks[SEQ_LENS[0]] <= budget else 'no'}")
    out = {
        "what": "planner prediction (not measured): QLoRA NF4-dq r=16 all-linear, grad checkpointing, "
                "loss chunk 1024, paged_adamw_8bit, micro-batch 1, FSDP when devices > 1",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "budget_bytes": budget,
        "hardware": "none needed (arithmetic); " + platform.platform(),
        "versions": {p: version(p) for p in ("litgpt", "bitsandbytes", "peft", "transformers")},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rows": rows,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
