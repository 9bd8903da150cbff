"""Our trainer vs TRL's SFTTrainer + peft vs litgpt's finetune_lora, back to back, on the CPU.

    python bench/cpu_vs_peers.py [--steps 12] [--warmup 2] [--only ours,ours-fp32,trl,litgpt] [--precision auto]
                                 [--profile 1] [--[no-]heldout] [--[no-]equal_tokens]
                                 [--ours-override KEY=VALUE ...] [--out bench/results/cpu-vs-peers.json]

Same model (SmolLM2-135M-Instruct: the embedded copy, converted once to litgpt's format in a temp
dir), same data (the first 950 rows of ../shared/data/alpaca/alpaca_cleaned_1000.json; the last 50
are held out), the same text (the model's chat template; litgpt through its smollm2 prompt style,
with `input` folded into the instruction as ours does), LoRA r=16 alpha=32 dropout 0 on every
linear layer but the head, seq len 512, micro = global batch 4, no gradient checkpointing, AdamW
lr 2e-4. Steps: --steps for the packed trainers; litgpt (one example per sequence) runs more
steps so that it trains on about as many tokens (--equal_tokens, default; the JSON gives
`trained_tokens_vs_ours`). Precision (--precision): auto (default) = bf16
where finetune.runtime's CPU probe measures a bf16 matmul faster than fp32, else fp32, for every
trainer: ours with precision=auto (frozen weights bf16, LoRA and AdamW state fp32), TRL with its
bf16=True (CPU autocast), litgpt with --precision bf16-true (its documented bf16 setting); fp32 or
bf16 force one for all. `ours-fp32` is ours at precision=32-true on the same batches: the loss
parity reference (`loss_vs_fp32` = final loss / ours-fp32's final loss - 1, target within 2 %). All three train on the response
tokens only (ours: data.train_on_prompt=false; TRL: prompt-completion data, completion-only loss;
litgpt: --data.mask_prompt true), so "trained tokens" (label != -100) mean the same thing. The
peers run at their documented fastest CPU settings: TRL packing=True (best-fit + padding-free),
litgpt's defaults (pads to the longest in the batch, its chunked head + loss).

Each trainer runs in its own subprocess (`--worker NAME`), which timestamps the end of every
optimizer step and counts each step's trained and non-pad tokens, causal attention pairs and head
positions from inside the real training loop; tokens/s is measured from the end of step `warmup`
to the end of step --steps, so model loading, tokenization and the first steps' allocator warm-up
are excluded for everyone. Peak RSS is the worker's own ru_maxrss (the process that trains).
Speed against the ceiling: model FLOPs of the timed steps (bench/flops.py) / their time, as a
fraction of the fp32 and bf16 matmul ceilings measured fresh at the bench's matmul shapes at the
start (bench/ceiling.py) and of the cached probe. --profile N more steps run under torch.profiler:
the share of a step in matmuls (and attention kernels) vs the rest, with the biggest other ops.
Quality: --heldout scores every trainer's adapter with one evaluator (bench/heldout.py):
`heldout_loss`, and `speedup_counts` = the speedup only where ours' held-out loss is within 0.2 %
of the best peer's (else null). --ours-override passes settings to our trainer only (recorded).
Prints one comparable line and writes JSON. The machine may be shared: the JSON records the load
average before and after each trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ceiling import StepProfiler, matmul_ceiling, matmul_shapes
from flops import Shape, row_pairs
from heldout import litgpt_to_hf, merged_instruction_rows, score, split_rows
import peers_report

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "data" / "alpaca" / "alpaca_cleaned_1000.json"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
RANK, ALPHA, DROPOUT, LR = 16, 32, 0.0, 2e-4  # dropout 0 (peft's default) for all three
SEQ_LEN, BATCH = 512, 4  # --seq_len / --batch (smaller only for a quick smoke run)
TRAINERS = ("ours", "ours-fp32", "trl", "litgpt")


def ours_overrides(precision: str = "auto") -> dict:
    """Ours, tuned honestly for this CPU: packing, head + loss only on trained positions (in one
    chunk, so no recompute), no checkpointing, precision=auto (bf16 frozen weights where this CPU
    measures bf16 faster), torch AdamW (bitsandbytes' 8-bit optimizers are a GPU memory feature)."""
    return {
        "model.name": "smollm2-135m", "accelerator": "cpu", "precision": precision,
        "data.path": str(DATA), "data.format": "alpaca", "data.seq_len": str(SEQ_LEN), "data.packing": "true",
        "data.train_on_prompt": "false", "data.val_fraction": "0.05",
        "lora.r": str(RANK), "lora.alpha": str(ALPHA), "lora.dropout": str(DROPOUT), "lora.target_modules": "[all-linear]",
        "train.micro_batch_size": str(BATCH), "train.global_batch_size": str(BATCH), "train.lr": str(LR),
        "train.warmup_steps": "2", "train.optimizer": "adamw", "train.gradient_checkpointing": "false",
        "train.loss_chunk_size": "4096", "train.eval_batches": "0", "train.seed": "42",
        "output.progress": "false", "output.plot": "false",
    }


# --------------------------------------------------------------------------- workers (one per subprocess)


class Recorder:
    """Per optimizer step: end time, trained tokens, non-pad tokens, loss, and for the FLOP count the
    causal attention pairs and the positions where the head's logits are computed. The `profile`
    steps after the timed ones run under torch.profiler (started and stopped at step ends)."""

    def __init__(self, timed_steps: int = 0, profile: int = 0):
        self.trained: list[int] = []
        self.nonpad: list[int] = []
        self.pairs: list[int] = []
        self.head: list[int] = []
        self.losses: list[float] = []
        self.ends: list[float] = []
        self.timed, self.profile, self.profiler = timed_steps, profile, StepProfiler()

    def batch(self, trained: int, nonpad: int, pairs: int, head: int) -> None:
        self.trained.append(trained)
        self.nonpad.append(nonpad)
        self.pairs.append(pairs)
        self.head.append(head)

    def step_end(self) -> None:
        self.ends.append(time.perf_counter())
        if self.profile and len(self.ends) == self.timed:
            self.profiler.start()
        elif self.profile and len(self.ends) == self.timed + self.profile:
            self.profiler.stop(self.profile)

    def result(self, warmup: int) -> dict:
        n = min(len(self.ends), self.timed or len(self.ends))  # the profiled steps are not timed
        if n <= warmup:
            raise RuntimeError(f"only {n} steps recorded, need more than warmup={warmup}")
        dt = self.ends[n - 1] - self.ends[warmup - 1] if warmup else None
        trained = sum(self.trained[warmup:n])
        nonpad = sum(self.nonpad[warmup:n])
        return {"steps": n, "measured_steps": n - warmup, "measured_s": round(dt, 2),
                "trained_tokens": trained, "nonpad_tokens": nonpad,
                "trained_tokens_per_s": round(trained / dt, 2), "nonpad_tokens_per_s": round(nonpad / dt, 2),
                "s_per_step": round(dt / (n - warmup), 2),
                "final_loss": round(self.losses[-1], 4) if self.losses else None,
                "losses": [round(x, 4) for x in self.losses],
                "trained_tokens_per_step": self.trained, "nonpad_tokens_per_step": self.nonpad,
                "attn_pairs_per_step": self.pairs, "head_positions_per_step": self.head,
                "trained_tokens_all_steps": sum(self.trained), "profile": self.profiler.summary}


def worker_ours(args, rec: Recorder, tmp: Path) -> dict:
    # Imported in the worker, not at the top: each worker process measures its own trainer's peak
    # RSS, so it must not load the other trainers' libraries.
    import torch

    from finetune.config import load_config
    from finetune.training import loop
    from finetune.training.objectives.sft import CausalLMLoss
    from finetune.training.progress import TrainProgress

    real_forward = CausalLMLoss._forward

    def counting_forward(self, input_ids, labels, position_ids):
        if torch.is_grad_enabled():
            pad = self.model.get_base_model().config.pad_token_id
            trained = int((labels[:, 1:] != -100).sum())  # ours computes the head only there
            rec.batch(trained, int((input_ids != pad).sum()), row_pairs(input_ids, pad, position_ids), trained)
        return real_forward(self, input_ids, labels, position_ids)

    def step_end(self, step, loss, lr, tok_s):
        rec.losses.append(float(loss))
        rec.step_end()

    CausalLMLoss._forward = counting_forward
    TrainProgress.update = step_end
    from finetune.runtime import CPU_PRECISION_ENV, base_dtype

    fp32 = args.worker == "ours-fp32"
    os.environ[CPU_PRECISION_ENV] = "bf16" if args.bf16 else "fp32"  # the driver's resolved choice
    overrides = {**ours_overrides("32-true" if fp32 else "auto"), "data.path": args.data,
                 "out_dir": str(Path(args.workdir) / "adapters" / args.worker),
                 "train.max_steps": str(args.steps + args.profile),
                 **dict(kv.split("=", 1) for kv in args.ours_override)}
    cfg = load_config(None, overrides)
    loop.main(loop.make_fabric(cfg), cfg)
    return {"settings": {k: v for k, v in overrides.items() if k != "out_dir"},
            "frozen_weights_dtype": str(base_dtype(cfg, "cpu")).replace("torch.", "")}


def alpaca_prompt_completion(path) -> list[dict]:
    """The same rows as conversational prompt/completion pairs (user text built as ours does)."""
    rows = json.loads(path.read_text())
    out = []
    for r in rows:
        prompt = f"{r['instruction']}\n\n{r['input']}" if r.get("input", "").strip() else r["instruction"]
        out.append({"prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": r["output"]}]})
    return out


def worker_trl(args, rec: Recorder, tmp: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from finetune.models.load import resolve_model_path

    path = resolve_model_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ds = Dataset.from_list(alpaca_prompt_completion(Path(args.data)))
    config = SFTConfig(
        output_dir=str(tmp / "trl"), max_steps=args.steps + args.profile, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1, learning_rate=LR, warmup_steps=2, max_length=SEQ_LEN,
        packing=True, completion_only_loss=True, gradient_checkpointing=False, bf16=args.bf16, fp16=False,
        use_cpu=True, report_to="none", logging_steps=1, save_strategy="no", eval_strategy="no",
        dataloader_num_workers=0, seed=42, disable_tqdm=True)
    peft_config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules="all-linear",
                             bias="none", task_type="CAUSAL_LM")

    class Counting(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            labels, ids = inputs["labels"], inputs["input_ids"]
            mask = inputs.get("attention_mask")
            pos = inputs.get("position_ids")
            pairs = (row_pairs(ids, -1, pos) if mask is None  # padding-free: no pads, documents by position
                     else row_pairs(ids.masked_fill(mask == 0, -1), -1, pos))
            # the model's head runs at every position of the batch
            rec.batch(int((labels[..., 1:] != -100).sum()), int(mask.sum()) if mask is not None else int(ids.numel()),
                      pairs, int(ids.numel()))
            loss = super().training_step(model, inputs, num_items_in_batch)
            rec.losses.append(float(loss.detach()))
            return loss

    class StepEnd(TrainerCallback):
        def on_step_end(self, *a, **k):
            rec.step_end()

    trainer = Counting(model=model, args=config, train_dataset=ds, processing_class=tok,
                       peft_config=peft_config, callbacks=[StepEnd()])
    trainer.train()
    trainer.save_model(str(Path(args.workdir) / "adapters" / "trl"))  # the peft adapter, for the held-out score
    # TRL's loss is a mean over the micro-batch's trained tokens; with no accumulation that is the
    # per-token loss, comparable with the others.
    return {"settings": {"packing": True, "packing_strategy": config.packing_strategy,
                         "padding_free": bool(config.padding_free or config.packing_strategy == "bfd"),
                         "completion_only_loss": True, "max_length": SEQ_LEN, "gradient_checkpointing": False,
                         "loss_type": config.loss_type, "optim": str(config.optim), "bf16": args.bf16,
                         "attn_implementation": model.config._attn_implementation}}


def litgpt_checkpoint(tmp: Path) -> Path:  # tmp: the run's workdir (merge_lora reads it back)
    """The embedded SmolLM2 converted with litgpt's own converter (offline: the directory is named
    after the hub id, which litgpt's config registry knows)."""
    from litgpt.scripts.convert_hf_checkpoint import convert_hf_checkpoint

    from finetune.models.load import resolve_model_path

    src = Path(resolve_model_path("smollm2-135m"))
    ckpt = tmp / "checkpoints" / HUB_ID
    ckpt.mkdir(parents=True)
    for f in src.iterdir():
        (ckpt / f.name).symlink_to(f)
    convert_hf_checkpoint(ckpt, model_name=HUB_ID.split("/")[1], dtype="float32")
    return ckpt


def worker_litgpt(args, rec: Recorder, tmp: Path) -> dict:
    import torch
    import litgpt.finetune.lora as lora
    from litgpt.model import GPT

    ckpt = litgpt_checkpoint(Path(args.workdir) / "litgpt-base")
    real_ce, real_sched, real_forward = lora.chunked_cross_entropy, lora.get_lr_scheduler, GPT.forward

    def counting_ce(logits, targets, *a, **k):
        loss = real_ce(logits, targets, *a, **k)
        if torch.is_grad_enabled():  # not the sanity-check validation
            rec.trained[-1] = int((targets != -100).sum())
            rec.losses.append(float(loss.detach()))
        return loss

    def counting_forward(self, idx, *a, **k):
        if torch.is_grad_enabled():  # litgpt's SFT collate pads with id 0; the head runs on every position
            rec.batch(0, int((idx != 0).sum()), row_pairs(idx, 0), int(idx.numel()))
        return real_forward(self, idx, *a, **k)

    def scheduler(*a, **k):
        s = real_sched(*a, **k)
        step = s.step

        def timed_step(*sa, **sk):
            rec.step_end()
            return step(*sa, **sk)

        s.step = timed_step
        return s

    lora.chunked_cross_entropy, lora.get_lr_scheduler, GPT.forward = counting_ce, scheduler, counting_forward
    data = merged_instruction_rows(Path(args.data), tmp / "train-litgpt.json")
    argv = [str(ckpt), "--out_dir", str(Path(args.workdir) / "adapters" / "litgpt"),
            "--precision", "bf16-true" if args.bf16 else "32-true",
            "--data", "JSON", "--data.json_path", str(data), "--data.mask_prompt", "true",
            "--data.prompt_style", "smollm2",
            "--data.val_split_fraction", "0.05",
            "--lora_r", str(RANK), "--lora_alpha", str(ALPHA), "--lora_dropout", str(DROPOUT),
            "--lora_query", "true", "--lora_key", "true", "--lora_value", "true", "--lora_projection", "true",
            "--lora_mlp", "true", "--lora_head", "false",
            "--train.micro_batch_size", str(BATCH), "--train.global_batch_size", str(BATCH),
            "--train.max_steps", str(args.steps + args.profile), "--train.max_seq_length", str(SEQ_LEN),
            "--train.lr_warmup_steps", "2", "--train.save_interval", str(10 ** 6),
            "--optimizer", json.dumps({"class_path": "torch.optim.AdamW", "init_args": {"lr": LR}}),
            "--eval.interval", str(10 ** 6), "--eval.initial_validation", "false",
            "--eval.final_validation", "false", "--seed", "42"]
    from litgpt.__main__ import main as litgpt_main

    sys.argv = ["litgpt", "finetune_lora", *argv]  # litgpt's own CLI entry point
    litgpt_main()
    return {"settings": {"cli": "litgpt finetune_lora " + " ".join(argv[1:]).replace(str(tmp), "$TMP")
                         .replace(args.workdir, "$WORK"),
                         "padding": "to the longest sequence in each batch (litgpt default)"}}


def run_worker(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.worker == "eval":  # the one evaluator, in its own process after all trainers
        return Path(args.result).write_text(json.dumps(eval_worker(args)))
    rec = Recorder(args.steps, args.profile)
    with tempfile.TemporaryDirectory(prefix=f"bench_{args.worker}_") as tmp:
        extra = {"ours": worker_ours, "ours-fp32": worker_ours, "trl": worker_trl,
                 "litgpt": worker_litgpt}[args.worker](args, rec, Path(tmp))
    res = {"trainer": args.worker, **rec.result(args.warmup), **extra, "torch_threads": torch.get_num_threads(),
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    Path(args.result).write_text(json.dumps(res))


def eval_worker(args) -> dict:
    from finetune.models.load import resolve_model_path

    base = Path(resolve_model_path("smollm2-135m"))
    work = Path(args.workdir)
    models = {}
    for name in args.only.split(","):
        if name == "litgpt":
            models[name] = str(litgpt_to_hf(work / "adapters" / "litgpt" / "final", base, work / "litgpt-hf"))
        elif name == "trl":
            models[name] = str(work / "adapters" / "trl")
        else:
            models[name] = str(work / "adapters" / name / "final")
    return score(models, base, work / "data", SEQ_LEN, work / "eval")


def model_shape() -> Shape:
    from finetune.models.load import resolve_model_path

    return Shape.from_config(json.loads((Path(resolve_model_path("smollm2-135m")) / "config.json").read_text()))


def equal_token_steps(steps: int, data: Path) -> tuple[int, float]:
    """Steps for litgpt (one example per sequence) to train on about as many tokens as the packed
    trainers do in `steps`: packing fits about SEQ_LEN / (mean tokens per example) examples per
    sequence (prompt and answer through the chat template)."""
    from transformers import AutoTokenizer

    from finetune.models.load import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    rows = alpaca_prompt_completion(data)
    lens = [min(len(tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=True, return_dict=False)), SEQ_LEN)
            for r in rows]
    per_seq = SEQ_LEN / (sum(lens) / len(lens))
    return max(steps, round(steps * per_seq)), round(per_seq, 2)


# --------------------------------------------------------------------------- driver


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per trainer (litgpt: see --equal_tokens)")
    ap.add_argument("--warmup", type=int, default=2, help="first steps excluded from the timing")
    ap.add_argument("--only", default=",".join(TRAINERS), help="comma-separated subset of " + ",".join(TRAINERS))
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="auto: bf16 for every trainer where finetune.runtime's CPU probe finds bf16 faster")
    ap.add_argument("--bf16", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "cpu-vs-peers.json"))
    ap.add_argument("--ours_override", "--ours-override", dest="ours_override", action="append", default=[],
                    metavar="KEY=VALUE", help="extra training-config override for our trainer (repeatable), "
                    "e.g. train.compile=layers")
    ap.add_argument("--profile", type=int, default=1,
                    help="steps after the timed ones run under torch.profiler (matmul vs the rest); 0: none")
    ap.add_argument("--heldout", action=argparse.BooleanOptionalAction, default=True,
                    help="score every trainer's adapter on the 50 held-out rows with one evaluator")
    ap.add_argument("--equal_tokens", action=argparse.BooleanOptionalAction, default=True,
                    help="litgpt (unpacked) runs more steps, so that every trainer trains on about as many tokens")
    ap.add_argument("--worker", choices=[*TRAINERS, "eval"], help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--seq_len", type=int, default=SEQ_LEN)
    ap.add_argument("--batch", type=int, default=BATCH, help="micro = global batch")
    return ap.parse_args()


def run_subprocess(name: str, argv: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = Path(f.name)
    proc = subprocess.run([sys.executable, __file__, "--worker", name, "--result", str(result_path), *argv],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        sys.exit(f"cpu_vs_peers: the {name} worker failed (exit {proc.returncode})")
    res = json.loads(result_path.read_text())
    result_path.unlink()
    return res


def main() -> None:
    global SEQ_LEN, BATCH
    args = parse_args()
    SEQ_LEN, BATCH = args.seq_len, args.batch
    if args.worker:
        return run_worker(args)
    if not DATA.is_file():
        sys.exit(f"cpu_vs_peers: data file not found: {DATA}")
    if not 0 < args.warmup < args.steps:
        sys.exit("cpu_vs_peers: need 0 < --warmup < --steps")

    from finetune.runtime import cpu_probe

    probe = cpu_probe()
    bf16 = {"fp32": False, "bf16": True, "auto": probe["bf16_faster"]}[args.precision]
    shape = model_shape()
    ceiling = matmul_ceiling(matmul_shapes(SEQ_LEN * BATCH, shape.linears(), shape.hidden, shape.vocab))
    print(f"cpu_vs_peers: {'bf16' if bf16 else 'fp32'} (probe: fp32 {probe['fp32_gflops']} GFLOP/s, "
          f"bf16 {probe['bf16_gflops']} GFLOP/s at {probe['shape']}; ceiling at the bench's shapes now: "
          f"fp32 {ceiling['fp32']['gflops']}, bf16 {ceiling['bf16']['gflops']} GFLOP/s)", flush=True)
    work = Path(tempfile.mkdtemp(prefix="cpu_vs_peers_"))
    split = split_rows(DATA, work / "data")
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    litgpt_steps, per_seq = equal_token_steps(args.steps, work / "data" / "train.json") if args.equal_tokens \
        else (args.steps, None)
    results = []
    for name in names:
        steps = litgpt_steps if name == "litgpt" else args.steps
        argv = ["--steps", str(steps), "--warmup", str(args.warmup), "--profile", str(args.profile),
                "--seq_len", str(SEQ_LEN), "--batch", str(BATCH), "--bf16", str(int(bf16)),
                "--workdir", str(work), "--data", str(work / "data" / "train.json")]
        argv += [f"--ours_override={kv}" for kv in args.ours_override]
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        res = run_subprocess(name, argv)
        res.update(wall_s=round(time.perf_counter() - t0, 1), loadavg_before=[round(x, 2) for x in load_before],
                   loadavg_after=[round(x, 2) for x in os.getloadavg()])
        res.update(peers_report.flops_of(res, shape, RANK, args.warmup, ceiling, probe))
        results.append(res)
        prof = res.get("profile") or {}
        print(f"  {name:9s} {res['trained_tokens_per_s']:7.1f} trained tok/s  {res['nonpad_tokens_per_s']:7.1f} "
              f"non-pad tok/s  {res['s_per_step']:6.2f} s/step  peak RSS {res['peak_rss_bytes'] / 2**20:6.0f} MiB  "
              f"final loss {res['final_loss']}  {res['achieved_gflops']} GFLOP/s "
              f"({res['fraction_of_ceiling']['bf16']:.0%} of bf16, {res['fraction_of_ceiling']['fp32']:.0%} of fp32 "
              f"ceiling; matmuls {prof.get('matmul_fraction')} of a profiled step)  "
              f"(load {res['loadavg_before'][0]:.1f})", flush=True)
    heldout = {}
    if args.heldout:
        heldout = run_subprocess("eval", ["--workdir", str(work), "--only", ",".join(names), "--seq_len", str(SEQ_LEN)])
        for r in results:
            r["heldout_loss"] = heldout.get(r["trainer"])
        print(f"  held-out loss ({split['heldout_rows']} rows, one evaluator): "
              + ", ".join(f"{k} {v}" for k, v in heldout.items()), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    write_report(args, bf16, probe, ceiling, split, results, heldout, litgpt_steps, per_seq)


def write_report(args, bf16, probe, ceiling, split, results, heldout, litgpt_steps, per_seq) -> None:
    summary = peers_report.summarize(results, heldout)
    print(peers_report.line(results, summary))
    setup = {"model": HUB_ID + " (embedded copy)", "data": "../shared/data/alpaca/alpaca_cleaned_1000.json",
             **split, "seq_len": SEQ_LEN, "micro_batch": BATCH, "global_batch": BATCH, "lora_r": RANK,
             "lora_alpha": ALPHA, "lora_dropout": DROPOUT, "lora_targets": "all linear layers except lm_head",
             "precision": "bf16" if bf16 else "fp32", "precision_arg": args.precision, "cpu_probe": probe,
             "gradient_checkpointing": False, "optimizer": f"AdamW lr {LR}",
             "steps": args.steps, "warmup_steps_excluded_from_timing": args.warmup,
             "litgpt_steps": litgpt_steps, "packed_examples_per_sequence_est": per_seq,
             "profiled_steps_after_timed": args.profile, "ours_overrides": args.ours_override,
             "prompt": "the model's chat template for all three (litgpt: its smollm2 prompt style)",
             "loss_on": "response tokens only, for all three",
             "heldout_eval": "finetune.eval loss metric (mean NLL per answer token, chat template, fp32) on the "
                             "held-out rows; ours/TRL: peft adapter on the base, litgpt: its LoRA merged by "
                             "litgpt merge_lora (fp32) + convert_lit_checkpoint" if args.heldout else None}
    peers_report.write(Path(args.out), REPO, setup, ceiling, summary, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
