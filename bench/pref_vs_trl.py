"""DPO trained pairs/s and peak RSS: finetune against TRL's DPOTrainer, same model, data, batch.

Each side runs in its own process (peak RSS is per process): the tiny-dpo recipe's model (or
--model), the shipped sample of pairs (datasets/samples/preference_sample.json), LoRA r=8 on all
linear layers, micro-batch --mb pairs, --steps optimizer steps after 2 warm-up steps, CPU. Each
side at its fastest precision: finetune with precision=auto (this CPU's probe), TRL with bf16
where the probe picks it. TRL is the `bench` extra; without it its line says so.

Usage: python bench/pref_vs_trl.py [--steps 10] [--mb 2] [--model tiny]
Prints one JSON line per side. Numbers taken on a shared, loaded machine are not reportable.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "datasets" / "samples" / "preference_sample.json"


def ours(a) -> dict:
    from finetune.config import load_config
    from finetune.training.loop import main, make_fabric

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config("tiny-dpo", {"out_dir": out + "/run", "model.name": a.model, "output.progress": "false",
                                       "train.max_steps": str(a.steps + 2), "train.micro_batch_size": str(a.mb),
                                       "train.global_batch_size": str(a.mb), "train.eval_every": "0",
                                       "data.val_fraction": "0", "output.loggers": "[csv]"})
        times = []
        import finetune.training.loop as loop

        real_step = loop.BatchStream.step_batches

        def timed(self, step):  # the time between two steps' batches = one optimizer step
            times.append(time.perf_counter())
            return real_step(self, step)

        loop.BatchStream.step_batches = timed
        main(make_fabric(cfg), cfg)
    dt = times[-1] - times[2]
    return {"side": "finetune", "pairs_per_s": round(a.mb * (len(times) - 3) / dt, 3)}


def trl_side(a) -> dict:
    try:
        import trl
        from datasets import Dataset
        from peft import LoraConfig
        from trl import DPOConfig, DPOTrainer
        from transformers import AutoModelForCausalLM, TrainerCallback
    except ImportError as e:
        return {"side": "trl", "skipped": f"not installed ({e.name})"}
    from finetune.config import load_config
    from finetune.data.preference_formats import read_preference_rows
    from finetune.models.load import load_tokenizer, resolve_model_path
    from finetune.runtime import resolve_precision

    cfg = load_config("tiny-dpo", {"model.name": a.model})
    bf16 = "bf16" in str(resolve_precision(cfg)[1])
    tok = load_tokenizer(cfg.model)
    rows = []
    for ex in read_preference_rows(SAMPLE).examples:
        msgs = ([{"role": "system", "content": ex.prompt.system}] if ex.prompt.system else []) + ex.prompt.messages
        rows.append({"prompt": msgs, "chosen": [ex.chosen], "rejected": [ex.rejected]})
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args, **kw):
            times.append(time.perf_counter())

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(a.model))
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=a.mb, max_steps=a.steps + 2, beta=0.1,
                         learning_rate=3e-3, report_to=[], use_cpu=True, bf16=bf16, save_strategy="no",
                         max_length=cfg.data.seq_len, logging_steps=10**6)
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                   peft_config=lora, callbacks=[Clock()]).train()
    times.append(time.perf_counter())
    dt = times[-1] - times[2]
    return {"side": "trl", "trl": trl.__version__, "bf16": bf16, "pairs_per_s": round(a.mb * (len(times) - 3) / dt, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--mb", type=int, default=2)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--side", choices=["finetune", "trl"])
    a = ap.parse_args()
    if a.side:  # one side, in this process
        rec = ours(a) if a.side == "finetune" else trl_side(a)
        rec["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print(json.dumps(rec))
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for side in ("finetune", "trl"):
        cmd = [sys.executable, __file__, "--side", side, "--steps", str(a.steps), "--mb", str(a.mb), "--model", a.model]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
        print(lines[-1] if lines else json.dumps({"side": side, "error": r.stderr.strip().splitlines()[-1:]}))


if __name__ == "__main__":
    main()
