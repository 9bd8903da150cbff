"""cpu_vs_peers.py's summary: FLOPs against the ceiling, speedups, loss parity, held-out loss gate; the printed line and the JSON."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from common import cpu_model, versions
from flops import PROJECTIONS, Shape, run_flops

HELDOUT_TOLERANCE = 0.002  # relative: ours' held-out loss may exceed the best peer's by 0.2 % (eval noise)


def flops_of(res: dict, shape: Shape, rank: int, warmup: int, ceiling: dict, probe: dict) -> dict:
    """Model FLOPs of the timed steps (bench/flops.py), achieved GFLOP/s and its fraction of the
    fp32 and bf16 matmul ceilings (fresh at the bench's shapes, and the cached probe's)."""
    sl = slice(warmup, res["steps"])
    f = run_flops(shape, rank, PROJECTIONS, res["nonpad_tokens_per_step"][sl], res["attn_pairs_per_step"][sl],
                  res["head_positions_per_step"][sl])
    gflops = f["total"] / res["measured_s"] / 1e9
    out = {"flops_timed_steps": f, "achieved_gflops": round(gflops, 2),
           "flops_per_trained_token": round(f["total"] / res["trained_tokens"]),
           "flops_per_nonpad_token": round(f["total"] / res["nonpad_tokens"]),
           "fraction_of_ceiling": {d: round(gflops / ceiling[d]["gflops"], 3) for d in ("fp32", "bf16")},
           "fraction_of_probe": {d: round(gflops / probe[f"{d}_gflops"], 3) for d in ("fp32", "bf16")
                                 if probe.get(f"{d}_gflops")}}
    prof = res.get("profile")
    if prof and prof.get("matmul_s"):
        # the profiled steps are the ones after the timed ones: their FLOPs, from the same counts
        ps = slice(res["steps"], res["steps"] + prof["profiled_steps"])
        pf = run_flops(shape, rank, PROJECTIONS, res["nonpad_tokens_per_step"][ps], res["attn_pairs_per_step"][ps],
                       res["head_positions_per_step"][ps])["total"]
        prof["gflops_inside_matmuls"] = round(pf / prof["matmul_s"] / 1e9, 2)
    return out


def summarize(results: list[dict], heldout: dict) -> dict:
    by = {r["trainer"]: r for r in results}
    summary: dict = {}
    peers = [by[p] for p in ("trl", "litgpt") if p in by]
    if "ours" in by and peers:
        best = max(peers, key=lambda r: r["trained_tokens_per_s"])
        ours = by["ours"]
        summary = {"best_peer": best["trainer"],
                   "speedup_vs_best_peer": round(ours["trained_tokens_per_s"] / best["trained_tokens_per_s"], 3),
                   "nonpad_speedup_vs_best_peer": round(
                       ours["nonpad_tokens_per_s"] / max(p["nonpad_tokens_per_s"] for p in peers), 3),
                   "rss_vs_min_peer": round(ours["peak_rss_bytes"] / min(p["peak_rss_bytes"] for p in peers), 3),
                   "target_speedup": 3.0}
        summary["trained_tokens_vs_ours"] = {r["trainer"]: round(r["trained_tokens_all_steps"]
                                                                 / ours["trained_tokens_all_steps"], 3) for r in peers}
        peer_losses = [heldout[p["trainer"]] for p in peers if heldout.get(p["trainer"]) is not None]
        if heldout.get("ours") is not None and peer_losses:
            best_loss = min(peer_losses)
            ok = heldout["ours"] <= best_loss * (1 + HELDOUT_TOLERANCE)
            summary["heldout_ok"] = ok
            summary["speedup_counts"] = summary["speedup_vs_best_peer"] if ok else None
    if "ours" in by and "ours-fp32" in by and by["ours-fp32"]["final_loss"]:
        summary["loss_vs_fp32"] = round(by["ours"]["final_loss"] / by["ours-fp32"]["final_loss"] - 1, 4)
        summary["speedup_vs_ours_fp32"] = round(by["ours"]["trained_tokens_per_s"]
                                                / by["ours-fp32"]["trained_tokens_per_s"], 3)
    if heldout:
        summary["heldout_loss"] = heldout
    return summary


def line(results: list[dict], summary: dict) -> str:
    out = "cpu_vs_peers: " + " | ".join(
        f"{r['trainer']} {r['trained_tokens_per_s']:.1f} tok/s, {r['peak_rss_bytes'] / 2**20:.0f} MiB, "
        f"loss {r['final_loss']}, held-out {r.get('heldout_loss')}, {r['achieved_gflops']} GFLOP/s" for r in results)
    if "best_peer" in summary:
        out += f" | speedup_vs_best_peer ({summary['best_peer']}) {summary['speedup_vs_best_peer']:.2f}x"
    if "heldout_ok" in summary:
        out += f", counts: {summary['speedup_counts']}"
    if "loss_vs_fp32" in summary:
        out += (f" | final loss vs fp32 {summary['loss_vs_fp32']:+.2%}, "
                f"{summary['speedup_vs_ours_fp32']:.2f}x ours-fp32's tok/s")
    return out


def write(path: Path, repo: Path, setup: dict, ceiling: dict, summary: dict, results: list[dict]) -> None:
    out = {
        "what": "trained (label != -100) tokens/s of LoRA fine-tuning SmolLM2-135M-Instruct on alpaca, CPU; "
                "model GFLOP/s vs this CPU's matmul ceiling; held-out loss of each trainer's adapter",
        "command": "python " + " ".join([Path(sys.argv[0]).resolve().relative_to(repo).as_posix(), *sys.argv[1:]]),
        "setup": setup,
        "matmul_ceiling": ceiling,
        "hardware": {"cpu": cpu_model(), "nproc": os.cpu_count(), "platform": platform.platform()},
        "versions": versions(("torch", "transformers", "peft", "trl", "litgpt", "lightning", "accelerate", "datasets")),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "note": "shared machine: see loadavg_before/after per trainer (2 cores; load > 2 means contention)",
        **summary,
        "results": results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
