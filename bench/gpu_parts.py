"""bench/gpu_qlora.py's parts beyond `speed`: `best` (each trainer at its largest micro-batch
within 11.5 GiB), `longest` (the longest 8B sequence) and `planner` (predicted vs measured peaks).
Their workers are gpu_qlora.py's (`ours`, `baseline`), each in a fresh process; see its docstring.

- best: the 7B of `speed` (seq 2048 packed, checkpointing, paged AdamW 8-bit), each trainer at the
  largest micro-batch that fits 11.5 GiB, since that, not micro-batch 1, is what a user of a 12 GB
  card runs. Ours: train.micro_batch_size=auto (the planner's choice against the capped device
  memory, finetune.plan.fit) with a global batch of BEST_GLOBAL, so auto may pick up to that;
  the worker records what it picked. The fair baseline has no planner: a measured search, from
  --best_start down, halving on OOM (or on a run that does not fit), each try a fresh process.
  Reports both runs, the baseline's tries and ours' tokens/s over the baseline's.
"""

from __future__ import annotations

from pathlib import Path

from gpu_qlora import GiB, OURS_VARIANTS, ours_cfg
from gpu_runner import SMOKE, Runner, fits

LONGCTX_RECIPE = "qlora-8b-longctx"  # the part `longest` measures this recipe's memory settings
LONGCTX_KEYS = ("train.gradient_checkpointing", "train.offload_activations", "train.mlp_tile_size",
                "train.loss_chunk_size", "lora.dropout", "model.attn_implementation")
BEST_GLOBAL = 16  # the global batch of `best`: train.micro_batch_size=auto picks a divisor of it
SMOKE_BEST = 2  # --cpu-smoke's global batch and first baseline micro-batch: every path, tiny work


def _best_fields(res: dict) -> dict:
    return {k: res.get(k) for k in ("ok", "micro_batch", "tokens_per_s", "reserved_plus_context_bytes",
                                    "fits_12GiB_card", "oom", "error", "skipped", "liger", "attention")}


def part_best(a, run: Runner, model_dir: Path, data: Path, seq: int = 2048) -> dict:
    """Ours at the planner's auto micro-batch and the fair baseline at its largest measured one,
    both within 11.5 GiB (this module's docstring)."""
    base = {"model_dir": str(model_dir), "data": str(data), "seq": seq, "steps": a.steps, "warmup": a.warmup}
    global_batch = SMOKE_BEST if SMOKE else BEST_GLOBAL
    part = run.out.setdefault("best", {"global_batch": global_batch, "baseline_tries": {}})
    res = run.worker("best-ours-auto", "ours", {**base, "micro": "auto", "overrides": {
        **OURS_VARIANTS["ours-ckpt"], "train.global_batch_size": str(global_batch)}})
    part["ours"] = {**res, **fits(res)}
    run.save()
    print(f"  best ours (auto -> micro-batch {res.get('micro_batch')}): {_outcome(part['ours'])}", flush=True)
    micro = min(a.best_start, SMOKE_BEST) if SMOKE else a.best_start
    while micro >= 1:
        res = run.worker(f"best-baseline-mb{micro}", "baseline", {**base, "micro": micro})
        res = {**res, **fits(res), "micro_batch": micro}
        part["baseline_tries"][str(micro)] = _best_fields(res)
        run.save()
        print(f"  best baseline micro-batch {micro}: {_outcome(res)}", flush=True)
        if res.get("ok") and (res.get("fits_12GiB_card") or SMOKE):
            part["baseline"] = res
            break
        if not (res.get("oom") or (res.get("ok") and not res.get("fits_12GiB_card"))):
            break  # skipped for time, or a failure that a smaller micro-batch would not cure
        micro //= 2
    ours, theirs = part["ours"], part.get("baseline") or {}
    if ours.get("tokens_per_s") and theirs.get("tokens_per_s"):
        part["speedup_vs_baseline"] = round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3)
    part["summary"] = {"ours": _best_fields(ours), "baseline": _best_fields(theirs) if theirs else None,
                       "speedup_vs_baseline": part.get("speedup_vs_baseline")}
    run.save()
    return part


def _outcome(res: dict) -> str:
    if res.get("ok"):
        return (f"{res.get('tokens_per_s', 0):.1f} tok/s, reserved + context "
                f"{(res.get('reserved_plus_context_bytes') or 0) / GiB:.2f} GiB")
    return f"failed: {res.get('error') or res.get('skipped')}"


PLANNER_CONFIGS = [  # (seq_len, micro_batch, gradient_checkpointing, offload_activations)
    (512, 1, True, False), (1024, 1, True, False), (2048, 1, True, False), (4096, 1, True, False),
    (2048, 2, True, False), (1024, 1, False, False), (2048, 1, False, True), (8192, 1, True, False),
]


def longctx_overrides() -> dict:
    """The long-context recipe's memory settings as overrides (sdpa where flash-attn is missing),
    one example per sequence (no packing: the rows are longer than any length tried)."""
    import importlib.util

    from finetune.config import load_config, to_dict

    recipe = to_dict(load_config(LONGCTX_RECIPE, {}))
    out = {key: str(recipe[key.split(".")[0]][key.split(".")[1]]) for key in LONGCTX_KEYS}
    if out["model.attn_implementation"] == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        out["model.attn_implementation"] = "sdpa"
    out["data.packing"] = "false"
    return out


def part_longest(a, run: Runner, model_dir: Path, data: Path) -> dict:
    from finetune.plan import predict as plan

    overrides = longctx_overrides()
    part = run.out.setdefault("longest", {"longest_seq_len": 0, "overrides": overrides, "tried": {}, "target": 32768})
    for seq in a.seq_lens:
        cfg, _ = ours_cfg(model_dir, data, seq, 1, 2, Path("unused"), **overrides)  # what the worker trains
        predicted = plan.predict(cfg, 1, seq).peak_bytes
        res = run.worker(f"longest-{seq}", "ours", {"model_dir": str(model_dir), "data": str(data), "seq": seq,
                                                   "micro": 1, "steps": 2, "warmup": 1, "overrides": overrides})
        res = {**res, **fits(res), "predicted_peak_bytes": predicted}
        part["tried"][seq] = res
        outcome = (f"ok, reserved + context {res['reserved_plus_context_bytes'] / GiB:.2f} GiB" if res.get("ok")
                   else f"failed: {res.get('error') or res.get('skipped')}")
        print(f"  longest seq {seq:6d} (predicted {predicted / GiB:.2f} GiB): {outcome}", flush=True)
        if not res.get("ok") or not res.get("fits_12GiB_card", SMOKE):
            break
        part["longest_seq_len"] = seq
        run.save()
    run.save()
    return part


def part_planner(a, run: Runner, model_dir: Path, data: Path, configs=None) -> dict:
    from finetune.plan import predict as plan

    part = run.out.setdefault("planner", {"configs": [], "target": 0.10})
    for seq, micro, ckpt, offload in configs or PLANNER_CONFIGS:
        ov = {"train.gradient_checkpointing": str(ckpt).lower(), "train.offload_activations": str(offload).lower()}
        cfg, _ = ours_cfg(model_dir, data, seq, micro, 2, Path("unused"), **ov)  # shape from its config.json
        p = plan.predict(cfg, micro, seq)
        predicted_alloc = p.peak_bytes - p.parts.get("cuda_context", 0) - p.parts.get("allocator_slack", 0)
        res = run.worker(f"planner-{seq}-{micro}-{int(ckpt)}{int(offload)}", "ours",
                         {"model_dir": str(model_dir), "data": str(data), "seq": seq, "micro": micro, "steps": 2,
                          "warmup": 1, "overrides": ov})
        row = {"seq_len": seq, "micro_batch": micro, "gradient_checkpointing": ckpt, "offload": offload,
               "predicted_peak_bytes": p.peak_bytes, "predicted_allocated_bytes": predicted_alloc,
               "measured": {**res, **fits(res)}}
        if res.get("ok") and res["peak_allocated_bytes"]:
            measured = row["measured"]["reserved_plus_context_bytes"]
            row.update(measured_peak_bytes=measured, error=round(p.peak_bytes / measured - 1, 4),
                       error_allocated=round(predicted_alloc / res["peak_allocated_bytes"] - 1, 4))
            print(f"  planner seq {seq:5d} mb {micro} ckpt {ckpt!s:5} offload {offload!s:5}: predicted "
                  f"{p.peak_bytes / GiB:5.2f} GiB, measured {measured / GiB:5.2f} GiB ({row['error']:+.1%})", flush=True)
        part["configs"].append(row)
        run.save()
    errors = [abs(r["error"]) for r in part["configs"] if "error" in r]
    part.update(max_abs_error=max(errors) if errors else None, within_10_percent=sum(e <= 0.10 for e in errors),
                measured_configs=len(errors))
    run.save()
    return part
