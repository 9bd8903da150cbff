"""The README's demo, after training: base vs adapter on held-out questions, side by side.

    python scripts/show_demo.py out/demo        # reads out/demo/eval (written by the demo recipe)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def show(run_dir: Path, examples: int = 8) -> None:
    from rich.console import Console
    from rich.table import Table

    eval_dir = run_dir / "eval"
    scores = json.loads((eval_dir / "scores.json").read_text())
    gens = sorted((eval_dir / "generations").glob("*.jsonl"))
    rows = {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in gens}
    base = rows.pop("base")
    adapter_name, adapter = next(iter(rows.items()))
    console = Console()
    table = Table(title="held-out questions (never seen in training)", show_lines=True)
    for col in ("question", "expected", "base SmolLM2-135M", "after fine-tuning"):
        table.add_column(col, overflow="fold")
    for b, a in list(zip(base, adapter))[:examples]:
        table.add_row(b["prompt"], b["answer"], b["output"].strip(), a["output"].strip())
    console.print(table)
    md = (eval_dir / "scores.md").read_text()
    console.print(md)
    console.print(f"full scorecard: {eval_dir}/scores.md, scores.json, scores.png; answers in {eval_dir}/generations/")
    del scores, adapter_name


if __name__ == "__main__":
    show(Path(sys.argv[1] if len(sys.argv) > 1 else "out/demo"))
