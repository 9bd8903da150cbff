"""Resident memory stays flat over a long run with periodic checkpoints and pruning.

    python bench/rss_soak.py [--steps 2000] [--save_every 100] [--keep_last 2] [--out bench/results/rss_soak.json]

Trains the tiny-lora recipe in this process on the CPU (fp32) with checkpoints every
`save_every` steps and `train.keep_last` pruning, sampling this process's RSS (psutil) right after
each checkpoint and once more after the final save. Growth is measured from the sample at step
200 (allocator, caches and the first checkpoint's buffers have settled by then) to the last one;
the issue's target is < 5%. Prints one line and writes the samples as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from finetune.config import load_config  # noqa: E402
from finetune.training import loop  # noqa: E402
from finetune.training.state import Saver  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--save_every", type=int, default=100)
    ap.add_argument("--keep_last", type=int, default=2)
    ap.add_argument("--baseline_step", type=int, default=200)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "rss_soak.json"))
    a = ap.parse_args()

    proc = psutil.Process()
    samples: list[dict] = []
    t0 = time.perf_counter()

    def sample(step: int) -> None:
        samples.append({"step": step, "rss_bytes": proc.memory_info().rss,
                        "elapsed_s": round(time.perf_counter() - t0, 1)})

    # Sample at each periodic checkpoint: wrap the loop's own save, so the run is the real one.
    real_save = Saver.save_step

    def save_and_sample(saver, state):
        path = real_save(saver, state)
        sample(state.step)
        return path

    Saver.save_step = save_and_sample
    with tempfile.TemporaryDirectory(prefix="rss_soak_") as tmp:
        out_dir = Path(tmp) / "run"
        overrides = {"out_dir": str(out_dir), "train.max_steps": str(a.steps), "train.save_every": str(a.save_every),
                     "train.keep_last": str(a.keep_last), "output.progress": "false", "output.plot": "false",
                     "train.log_every": "100"}
        cfg = load_config("tiny-lora", overrides)
        fabric = loop.make_fabric(cfg)
        loop.main(fabric, cfg)
        sample(a.steps)  # after the final save
        step_dirs = sorted(p.name for p in out_dir.glob("step-*"))

    by_step = {s["step"]: s["rss_bytes"] for s in samples}
    base_step = a.baseline_step if a.baseline_step in by_step else samples[0]["step"]
    base, last = by_step[base_step], samples[-1]["rss_bytes"]
    growth = (last - base) / base * 100
    peak = max(s["rss_bytes"] for s in samples if s["step"] >= base_step)
    print(f"rss_soak: {a.steps} steps, save_every={a.save_every}, keep_last={a.keep_last}: RSS "
          f"{base / 2**20:.1f} MiB at step {base_step} -> {last / 2**20:.1f} MiB at step {a.steps} "
          f"({growth:+.2f}%, peak {peak / 2**20:.1f} MiB); {step_dirs} kept; {samples[-1]['elapsed_s']:.0f} s")
    result = {
        "what": "resident memory of an in-process tiny-lora CPU fp32 run with periodic checkpoints + keep_last",
        "command": " ".join([*(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ),
                             "python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "config_overrides": {k: v for k, v in overrides.items() if k != "out_dir"},
        "hardware": f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} CPU(s), "
                    f"{psutil.virtual_memory().total / 2**30:.1f} GiB RAM; {platform.platform()}",
        "versions": {"python": platform.python_version(),
                     **{p: version(p) for p in ("torch", "transformers", "peft", "lightning", "psutil")}},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "baseline_step": base_step,
        "growth_percent": round(growth, 3),
        "target_percent": 5.0,
        "passed": growth < 5.0,
        "step_dirs_at_end": step_dirs,
        "samples": samples,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
