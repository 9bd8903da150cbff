"""`finetune plan`: print the prediction as a table or JSON; `measure=true` checks it on this machine.

The work is finetune.plan.predict (the prediction), finetune.plan.show (the table) and
finetune.training.measure (the measured step of measure=true). Importing this module must not import torch
(tests/plan/test_predict.py checks it): only `measure=true` loads torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal, Optional

from finetune.errors import UsageError
from finetune.plan.fit import report
from finetune.plan.predict import parse_bytes
from finetune.plan.shapes import model_shape
from finetune.plan.show import print_measured, print_table
from finetune.ranges import ranged


@dataclass
class Args:
    recipe: Optional[str] = None
    """Recipe to plan (name from recipes/ or a path; default: the built-in defaults). Other
    key=value pairs override its fields, e.g. devices=4 strategy=fsdp data.seq_len=4096."""
    gpu_memory: str = "12GiB"
    """Memory budget per GPU: 12GiB, 24GB, 16000MiB or a number of bytes."""
    format: Literal["table", "json"] = "table"
    """table (human readable) or json (one object with peak_bytes and the itemised parts)."""
    slack: float = ranged(0.10, ge=0, lt=1)
    """Allocator slack / fragmentation added on top of what torch allocates, as a fraction."""
    measure: bool = False
    """Also run two real training steps (synthetic packed tokens) on this machine's device, CPU
    or GPU, and print the measured peak next to the prediction for that device. JSON then has
    predicted_/measured_static_bytes (weights, quantization constants, LoRA, optimizer state)
    and predicted_/measured_peak_bytes (GPU: reserved + CUDA context vs the whole prediction;
    CPU: torch's allocated peak vs the prediction without context and slack)."""


def run(args: Args, cfg) -> int:
    budget = parse_bytes(args.gpu_memory)
    ctx = model_shape(cfg.model.name, cfg.model.revision).context
    if ctx is not None and cfg.data.seq_len > ctx:  # the same refusal training makes (training.preflight)
        raise UsageError(f"data.seq_len={cfg.data.seq_len} is past the context of {cfg.model.name} ({ctx} tokens); "
                         f"use data.seq_len<={ctx}")
    if args.measure:  # torch and the model: loaded only for measure=true
        from finetune.training.measure import add_measurement, measured_device_cfg

        cfg = measured_device_cfg(cfg)
    rep = report(cfg, budget, args.slack)
    if ctx is not None:  # what fits in memory, but no longer than the model's positions go
        rep["max_seq_len"] = min(rep["max_seq_len"], ctx)
        tiles = rep.get("max_seq_len_with_mlp_tiles")
        if tiles:
            tiles["max_seq_len"] = min(tiles["max_seq_len"], ctx)
            if tiles["max_seq_len"] <= rep["max_seq_len"]:
                del rep["max_seq_len_with_mlp_tiles"]
    if args.measure:
        add_measurement(cfg, rep)
    if args.format == "json":
        print(json.dumps(rep, indent=2))
    else:
        print_table(rep)
        if args.measure:
            print_measured(rep)
    return 0
