"""The data as `finetune data` shows it: rendered examples with the trained tokens highlighted,
then the statistics (rows loaded and dropped, tokens, trained fraction, truncation, packing).
Preference data: each pair's prompt (context) once, then the chosen and the rejected answer, the
tokens that count (a KTO answer: green when desirable, red when not)."""

from __future__ import annotations

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from finetune.data.dump import is_preference, unpacked
from finetune.data.pipeline import DataBundle
from finetune.data.tokenize import IGNORE


def show_example(console: Console, tokenizer, ids: list[int], labels: list[int], title: str) -> None:
    """One example in a panel: trained tokens bold green, context dim."""
    text = Text()
    # Decode runs of equal trainedness together so multi-byte characters stay whole.
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE) != (labels[start] != IGNORE):
            piece = tokenizer.decode(ids[start:i], skip_special_tokens=False)
            text.append(piece, style="bold green" if labels[start] != IGNORE else "dim")
            start = i
    console.print(Panel(text, title=title, title_align="left", subtitle="[bold green]trained[/] / [dim]context[/]"))


def show_pair(console: Console, tokenizer, unit: dict, title: str) -> None:
    """One preference unit in a panel: the prompt dim, each answer (what counts) in colour."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    text = Text()
    text.append(decode(unit["prompt_ids"]), style="dim")
    sides = [("chosen", "bold green"), ("rejected", "bold red")] if "chosen_ids" in unit else [
        ("completion", "bold green" if unit.get("label") else "bold red")]
    for side, style in sides:
        text.append(f"\n--- {side}{'' if side != 'completion' else ' (label ' + str(bool(unit['label'])).lower() + ')'}"
                    f": {len(unit[side + '_ids'])} tokens count ---\n", style="italic")
        text.append(decode(unit[side + "_ids"]), style=style)
    console.print(Panel(text, title=title, title_align="left",
                        subtitle="[dim]prompt: context[/] / [bold green]chosen[/] [bold red]rejected[/]: counted"))


def show_data(console: Console, tokenizer, bundle: DataBundle, n: int) -> None:
    """The first `n` training examples (packing undone), then the statistics table."""
    if is_preference(bundle.train):
        kind = "pair" if "chosen_ids" in bundle.train[0] else "answer"
        for i, unit in enumerate(bundle.train[:n]):
            show_pair(console, tokenizer, unit, f"{kind} {i + 1}: prompt {len(unit['prompt_ids'])} tokens")
    for shown, (ids, labels) in enumerate(() if is_preference(bundle.train) else unpacked(bundle.train)):
        if shown >= n:
            break
        trained = sum(1 for x in labels if x != IGNORE)
        show_example(console, tokenizer, ids, labels, f"example {shown + 1}: {len(ids)} tokens, {trained} trained")
    table = Table(title="data statistics", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for k, v in bundle.stats.rows():
        table.add_row(k, v)
    console.print(table)
    if bundle.stats.cached:
        console.print("[dim](tokenized data read from cache; data.cache=false recomputes it)[/]")
