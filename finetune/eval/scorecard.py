"""The scorecard: scores.json for machines, scores.md and the terminal table for people,
scores.png as a chart. Checkpoints are columns (base first), task/metric pairs are rows, and
every non-base cell shows its delta against the base. Each file is written whole or not at all
(finetune.fs), so an interrupted run never leaves a half scorecard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from matplotlib import rcParams
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from finetune.eval.conventions import label
from finetune.eval.metrics import LOWER_IS_BETTER, metric_unit
from finetune.fs import atomic_file, atomic_write


def build_scorecard(suite, models: list[dict], scores: dict[str, dict[str, float]], tasks: dict[str, dict]) -> dict:
    """models: [{name, path, kind}], scores: {model name: {"task/metric": value}}."""
    keys: list[str] = []
    for per_model in scores.values():
        for k in per_model:
            if k not in keys:
                keys.append(k)
    rows = []
    for k in keys:
        task, _, metric = k.partition("/")
        conv = (tasks.get(task) or {}).get("convention")
        row = {"key": k, "task": task, "metric": metric, "lower_is_better": metric in LOWER_IS_BETTER}
        if conv:
            # Each score says how it was prompted and what its unit is: numbers under different
            # conventions are not comparable, and the scorecard may hold both side by side.
            row["convention"] = label(conv)
            row["unit"] = metric_unit(metric.split("[")[0], conv["prompt"])
        rows.append(row)
    return {"suite": suite.name, "description": suite.description, "suite_path": str(suite.path),
            "models": models, "rows": rows, "scores": scores, "tasks": tasks}


def base_column(card: dict) -> Optional[str]:
    names = [m["name"] for m in card["models"]]
    return "base" if "base" in names else None


def _fmt(metric: str, v: Optional[float]) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return str(v)
    if metric == "loss":
        return f"{v:.4f}"
    return f"{v:.2f}"


def table_rows(card: dict) -> tuple[list[str], list[list[str]]]:
    """Header and body of the human table (shared by markdown and terminal)."""
    names = [m["name"] for m in card["models"]]
    base = base_column(card)
    header = ["task", "metric", *names]
    body = []
    for r in card["rows"]:
        arrow = "↓" if r["lower_is_better"] else "↑"
        cells = [r["task"], f"{r['metric']} {arrow}"]
        b = card["scores"].get(base, {}).get(r["key"]) if base else None
        for name in names:
            v = card["scores"].get(name, {}).get(r["key"])
            cell = _fmt(r["metric"], v)
            if base and name != base and v is not None and b is not None and math.isfinite(v) and math.isfinite(b):
                cell += f" ({v - b:+.{4 if r['metric'] == 'loss' else 2}f})"
            cells.append(cell)
        body.append(cells)
    return header, body


def to_markdown(card: dict) -> str:
    header, body = table_rows(card)
    lines = [f"# Eval: {card['suite']}", ""]
    if card.get("description"):
        lines += [card["description"], ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    lines += ["", "↑ higher is better, ↓ lower is better; (±x) is the change against `base`. "
              "Generation metrics are on a 0-100 scale.", "", "| checkpoint | kind | path |", "|---|---|---|"]
    lines += [f"| {m['name']} | {m['kind']} | `{m['path']}` |" for m in card["models"]]
    tasks = card.get("tasks") or {}
    if tasks:
        lines += ["", "| task | convention | examples | data |", "|---|---|---:|---|"]
        lines += [f"| {t} | {_cell(label(info['convention'])) if info.get('convention') else '-'} | "
                  f"{info.get('n', '-')} | `{info.get('data', '')}` |" for t, info in tasks.items()]
    units = [(r["key"], r["unit"]) for r in card["rows"] if r.get("unit")]
    if units:
        lines += ["", "| score | unit / normalisation |", "|---|---|"]
        lines += [f"| {k} | {_cell(u)} |" for k, u in units]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def print_table(card: dict) -> None:
    header, body = table_rows(card)
    table = Table(title=f"eval: {card['suite']}")
    for i, h in enumerate(header):
        table.add_column(h, justify="right" if i >= 2 else "left")
    for row in body:
        table.add_row(*row)
    console = Console()
    console.print(table)
    for t, info in (card.get("tasks") or {}).items():
        if info.get("convention"):
            console.print(f"  {t}: {label(info['convention'])}", highlight=False, markup=False)


def plot(card: dict, path: Path) -> None:
    """One small bar chart per task/metric (their scales differ), one bar per checkpoint."""
    rows = card["rows"]
    names = [m["name"] for m in card["models"]]
    n = max(len(rows), 1)
    cols = min(4, n)
    nrows = math.ceil(n / cols)
    # A bare Figure, not pyplot: no global backend switch in the caller's process, nothing to close.
    fig = Figure(figsize=(3.2 * cols + 0.5, 2.8 * nrows + 0.6))
    axes = fig.subplots(nrows, cols, squeeze=False)
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, r in zip(axes.flat, rows):
        vals = [card["scores"].get(name, {}).get(r["key"]) for name in names]
        shown = [v if v is not None and math.isfinite(v) else 0.0 for v in vals]
        bars = ax.bar(range(len(names)), shown, color=[colors[i % len(colors)] for i in range(len(names))])
        for b, v in zip(bars, vals):
            ax.annotate(_fmt(r["metric"], v), (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
        ax.set_title(f"{r['task']}: {r['metric']} {'↓' if r['lower_is_better'] else '↑'}", fontsize=9)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        if r["lower_is_better"]:
            ax.margins(y=0.15)
        else:  # the 0-100 metrics share one fixed scale, so bar heights compare across panels
            ax.set_ylim(0, 108)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle(f"eval suite: {card['suite']}", fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=110)


def write_scorecard(card: dict, out_dir: Path, show: bool = True) -> dict[str, Path]:
    """scores.json, scores.md and scores.png in out_dir (and the table on the terminal)."""
    paths = {"json": out_dir / "scores.json", "md": out_dir / "scores.md", "png": out_dir / "scores.png"}
    atomic_write(paths["json"], json.dumps(card, indent=2, allow_nan=True) + "\n")
    atomic_write(paths["md"], to_markdown(card))
    plot(card, paths["png"])
    if show:
        print_table(card)
    return paths
