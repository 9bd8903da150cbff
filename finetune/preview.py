"""`finetune data recipe=... [n=3]`: look at the training data before spending GPU hours.

Shows n rendered examples with the trained tokens highlighted, then the statistics: rows
loaded, rows dropped per reason, tokens, trained-token fraction, truncation, packing efficiency.
With dump=PATH every training example is also written to PATH as a JSON line (see finetune.data.dump).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from finetune.data.dump import check_dump_path, dump_examples, unpacked
from finetune.models.load import load_tokenizer
from finetune.ranges import ranged
from finetune.training.objectives import objective_for


@dataclass
class Args:
    recipe: Optional[str] = None
    """Recipe whose data section to preview (name from recipes/ or a path); data.* keys override it."""
    n: int = ranged(3, ge=0)
    """How many rendered training examples to show."""
    dump: Optional[str] = None
    """Write every training example (packing undone) to this file, one JSON object a line:
    text, input_ids, labels and trained (the decoded trained segments)."""


def _show_example(console, tokenizer, ids: list[int], labels: list[int], title: str) -> None:
    text = Text()
    # Decode runs of equal trainedness together so multi-byte characters stay whole.
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != -100) != (labels[start] != -100):
            piece = tokenizer.decode(ids[start:i], skip_special_tokens=False)
            text.append(piece, style="bold green" if labels[start] != -100 else "dim")
            start = i
    console.print(Panel(text, title=title, title_align="left", subtitle="[bold green]trained[/] / [dim]context[/]"))


def run(args: Args, cfg) -> int:
    if args.dump:
        check_dump_path(args.dump)
    console = Console()
    tokenizer = load_tokenizer(cfg.model)  # the training tokenizer, pad token fixed as in training
    bundle = objective_for(cfg).prepare(tokenizer, progress=cfg.output.progress)
    for shown, (ids, labels) in enumerate(unpacked(bundle.train)):
        if shown >= args.n:
            break
        trained = sum(1 for x in labels if x != -100)
        _show_example(console, tokenizer, ids, labels, f"example {shown + 1}: {len(ids)} tokens, {trained} trained")
    table = Table(title="data statistics", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for k, v in bundle.stats.rows():
        table.add_row(k, v)
    console.print(table)
    if bundle.stats.cached:
        console.print("[dim](tokenized data read from cache; data.cache=false recomputes it)[/]")
    if args.dump:
        n = dump_examples(bundle.train, tokenizer, args.dump)
        console.print(f"wrote {n:,} training examples to {args.dump}")
    return 0
