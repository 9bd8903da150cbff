"""What fits a memory budget, searched with the planner's predictions (finetune.plan.predict): the
largest micro-batch and sequence length, `train.micro_batch_size=auto`, and the report
`finetune plan` prints (finetune.plan.show) or writes as JSON.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from finetune.plan.predict import GiB, predict

CPU_MICRO_BATCH_CAP = 8  # on CPU bigger micro-batches only add latency, not throughput
HINT_MLP_TILE = 2048  # the tile size the table's footer suggests (what recipes/qlora-8b-longctx.yaml uses)


def _largest(fits, lo: int, hi: int) -> int:
    """Largest x in [lo, hi] with fits(x), assuming fits is monotone decreasing; lo - 1 if none."""
    if not fits(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def max_micro_batch(cfg, budget_bytes: int, seq_len: Optional[int] = None, slack: float = 0.10,
                    limit: int = 4096) -> int:
    """Largest micro-batch at seq_len (default: the recipe's) whose peak fits; 0 if none."""
    return _largest(lambda b: predict(cfg, b, seq_len, slack).peak_bytes <= budget_bytes, 1, limit)


def max_seq_len(cfg, budget_bytes: int, micro_batch: Optional[int] = None, slack: float = 0.10,
                limit: int = 1 << 20) -> int:
    """Largest seq_len (a multiple of 64) at micro_batch (default: the recipe's) that fits; 0 if none."""
    n = _largest(lambda k: predict(cfg, micro_batch, 64 * k, slack).peak_bytes <= budget_bytes, 1, limit // 64)
    return 64 * n


def auto_micro_batch(cfg, budget_bytes: int, cap: Optional[int] = None) -> int:
    """`train.micro_batch_size=auto`: the largest micro-batch that fits `budget_bytes` and divides the
    per-device share of the global batch (so accumulation stays exact). Always >= 1."""
    world = cfg.devices * cfg.num_nodes
    per_device = max(cfg.train.global_batch_size // world, 1)
    cap = cap or (CPU_MICRO_BATCH_CAP if cfg.accelerator == "cpu" else per_device)
    best = min(max_micro_batch(cfg, budget_bytes, limit=per_device), cap, per_device)
    while best > 1 and cfg.train.global_batch_size % (best * world):
        best -= 1
    return max(best, 1)


def report(cfg, budget: int, slack: float = 0.10) -> dict:
    auto = cfg.train.micro_batch_size == "auto"
    plan = predict(cfg, auto_micro_batch(cfg, budget) if auto else None, slack=slack)
    out = {
        "model": plan.model, "quant": cfg.quant.mode, "devices": plan.world_size, "strategy": plan.strategy,
        "micro_batch": plan.micro_batch, "seq_len": plan.seq_len,
        "gradient_checkpointing": cfg.train.gradient_checkpointing,
        "loss_chunk_size": cfg.train.loss_chunk_size,
        "n_params": plan.shape.n_params(),
        "peak_bytes": plan.peak_bytes, "peak_gib": round(plan.peak_bytes / GiB, 3),
        "load_peak_bytes": plan.load_peak_bytes, "load_fits": plan.load_peak_bytes <= budget,
        "budget_bytes": budget, "fits": plan.peak_bytes <= budget,
        "parts": plan.parts,
        "activations_detail": plan.activations_detail,
        "max_micro_batch": max_micro_batch(cfg, budget, slack=slack),
        "max_seq_len": max_seq_len(cfg, budget, micro_batch=plan.micro_batch, slack=slack),
        "micro_batch_auto": auto,
        "notes": plan.notes,
        "shape": dataclasses.asdict(plan.shape),
    }
    if not cfg.train.mlp_tile_size and not plan.shape.n_expert:
        tiles = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mlp_tile_size=HINT_MLP_TILE))
        longest = max_seq_len(tiles, budget, micro_batch=plan.micro_batch, slack=slack)
        if longest > out["max_seq_len"]:
            out["max_seq_len_with_mlp_tiles"] = {"mlp_tile_size": HINT_MLP_TILE, "max_seq_len": longest}
    return out
