"""`finetune plan`: print the prediction as a table or JSON; `measure=true` checks it on this machine.

Importing this module must not import torch (tests/plan/test_predict.py checks it): only
`measure=true` loads torch, through finetune.training.measure.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Literal, Optional

from rich.console import Console
from rich.table import Table

from finetune.errors import UsageError
from finetune.plan.predict import CUDA_CONTEXT_BYTES, GiB, MiB, parse_bytes, report
from finetune.plan.shapes import model_shape
from finetune.ranges import check_ranges, ranged


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


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def print_table(rep: dict) -> None:
    title = (f"{rep['model']} · {rep['quant']} · {rep['devices']} device(s) {rep['strategy']} · "
             f"micro-batch {rep['micro_batch']} x seq {rep['seq_len']} · per device")
    rows = [(k.replace("_", " "), _gib(v), rep["notes"].get(k, "")) for k, v in rep["parts"].items()]
    verdict = "fits" if rep["fits"] else "does NOT fit"
    footer = [
        f"peak {_gib(rep['peak_bytes'])} GiB of {_gib(rep['budget_bytes'])} GiB budget: {verdict}",
        f"activations with checkpointing {_gib(rep['activations_detail']['with_checkpointing'])} GiB, "
        f"without {_gib(rep['activations_detail']['without_checkpointing'])} GiB",
        f"largest micro-batch at seq {rep['seq_len']}: {rep['max_micro_batch']}; "
        f"largest seq_len at micro-batch {rep['micro_batch']}: {rep['max_seq_len']}",
    ] + ([rep["notes"]["strategy"]] if "strategy" in rep["notes"] else [])
    if "max_seq_len_with_mlp_tiles" in rep:
        hint = rep["max_seq_len_with_mlp_tiles"]
        footer.append(f"with train.mlp_tile_size={hint['mlp_tile_size']}: largest seq_len {hint['max_seq_len']}")
    table = Table(title=title)
    table.add_column("part")
    table.add_column("GiB", justify="right")
    table.add_column("note")
    for row in rows:
        table.add_row(*row)
    table.add_section()
    table.add_row("peak", _gib(rep["peak_bytes"]), verdict, style="bold")
    console = Console()
    console.print(table)
    for line in footer[1:]:
        console.print(line)


def run(args: Args, cfg) -> int:
    check_ranges(args)  # the CLI built Args checked; this is for Args made in Python
    budget = parse_bytes(args.gpu_memory)
    if args.measure:
        cfg = _measured_device_cfg(cfg)
    rep = report(cfg, budget, args.slack)
    if args.measure:
        rep["measured"] = _measure(cfg, rep)
        rep.update(_measured_summary(rep))
    if args.format == "json":
        print(json.dumps(rep, indent=2))
    else:
        print_table(rep)
        if args.measure:
            _print_measured(rep)
    return 0


# --------------------------------------------------------------------------- measure=true

CPU_MEASURE_MAX_PARAMS = 2_000_000_000  # beyond this a CPU step takes too long to be a check


def _measured_device_cfg(cfg):
    """cfg with accelerator set to the device the measurement will run on, so the prediction it is
    compared with is for that device (dtype, dropout masks, CPU attention, no CUDA context)."""
    from finetune.runtime import (  # torch: loaded only when measure=true asks for it
        default_device,
        planned_precision,
    )

    device = default_device(cfg.accelerator)
    if device.type == "cpu" and model_shape(cfg.model.name, cfg.model.revision).n_params() > CPU_MEASURE_MAX_PARAMS:
        raise UsageError(f"measure=true: {cfg.model.name} is too big to measure on this machine's CPU; "
                         "run it where a GPU is, or measure a smaller model")
    # precision=auto resolved as the runtime resolves it here (on a CPU: its probe's choice)
    return dataclasses.replace(cfg, accelerator=device.type, precision=planned_precision(cfg, device))


STATIC_PARTS = ("quantized_weights", "base_weights", "unquantized_weights", "lora_params", "optimizer_state")


def _measured_summary(rep: dict) -> dict:
    """The four numbers `measure=true` is for, side by side (bytes)."""
    m, parts = rep["measured"], rep["parts"]
    gpu = "peak_reserved_bytes" in m
    return {
        "predicted_static_bytes": sum(parts.get(k, 0) for k in STATIC_PARTS),
        "measured_static_bytes": m["static_bytes_total"],
        "predicted_peak_bytes": rep["peak_bytes"] if gpu else m["predicted_allocated_bytes"],
        "measured_peak_bytes": m["peak_with_context_bytes"] if gpu else m["peak_allocated_bytes"],
    }


def _measure(cfg, rep: dict) -> dict:
    from finetune.training.measure import (
        measure,  # torch and the model: only for measure=true
    )

    m = measure(cfg, micro_batch=rep["micro_batch"], seq_len=rep["seq_len"])
    parts = rep["parts"]
    predicted = sum(v for k, v in parts.items() if k not in ("cuda_context", "allocator_slack"))
    m["predicted_allocated_bytes"] = predicted
    m["error"] = round(predicted / m["peak_allocated_bytes"] - 1, 4)
    if "peak_reserved_bytes" in m:  # what nvidia-smi would show, against the whole prediction
        m["peak_with_context_bytes"] = m["peak_reserved_bytes"] + m.get("context_bytes", CUDA_CONTEXT_BYTES)
        m["error_with_context_and_slack"] = round(rep["peak_bytes"] / m["peak_with_context_bytes"] - 1, 4)
    return m


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def _print_measured(rep: dict) -> None:
    m = rep["measured"]
    print(f"static (weights, quantization constants, LoRA, optimizer state): predicted "
          f"{_size(rep['predicted_static_bytes'])}, measured {_size(rep['measured_static_bytes'])}")
    print(f"measured on {m['device']}, one training step at micro-batch {m['micro_batch']} x seq {m['seq_len']} "
          f"({m['step_seconds']:.1f} s): torch allocated peak {_size(m['peak_allocated_bytes'])}, "
          f"predicted {_size(m['predicted_allocated_bytes'])} (without CUDA context and slack): "
          f"error {100 * m['error']:+.1f}%")
    if "peak_reserved_bytes" in m:
        print(f"reserved peak + CUDA context {_size(m['peak_with_context_bytes'])} vs predicted peak: "
              f"error {100 * m['error_with_context_and_slack']:+.1f}%")
