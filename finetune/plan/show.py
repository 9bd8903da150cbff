"""What `finetune plan` prints: the prediction as an itemised table per device and, with
`measure=true`, two real training steps on this machine measured beside it.

Importing this module must not import torch (`finetune plan` without measure never loads it);
the measured step of `measure=true` is finetune.training.measure's.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from finetune.plan.predict import GiB, MiB


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def print_table(rep: dict) -> None:
    """`rep` (finetune.plan.fit.report) as a table of parts, the verdict and the largest fits."""
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
        f"while loading (before the first step) {_gib(rep['load_peak_bytes'])} GiB: "
        f"{'fits' if rep['load_fits'] else 'does NOT fit'}",
    ] + [f"{k}: {rep['notes'][k]}" if k == "precision" else rep["notes"][k]
         for k in ("strategy", "precision", "compile") if k in rep["notes"]]
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


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def print_measured(rep: dict) -> None:
    """The measured step against the prediction (`rep` after add_measurement)."""
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
