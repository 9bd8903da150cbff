"""Collect the MoE demo's scorecards (bench/moe_demo.sh) into bench/results/moe_demo.json + a table.

Columns are labelled by role (base, expert-geo, expert-units, expert-verdict, moe[, moe+router])
from the order moe_demo.sh passes them to `finetune eval`. The aim of issue 7 section 6 is checked
per metric: on each task suite the MoE keeps >= 95% of that task's expert, and on the mixed suite
the MoE beats every single expert.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

ROLES = ["base", "expert-geo", "expert-units", "expert-verdict", "moe", "moe+router"]
EXTRA_ROLES: list[str] = []  # variants evaluated separately (--extra NAME=DIR), appended as columns
SUITES = {"moe-geo": "expert-geo", "moe-units": "expert-units", "moe-verdict": "expert-verdict", "moe-mixed": None}
METRICS = ["exact_match", "contains", "rouge_l", "chrf", "loss"]


def load(eval_dir: Path) -> dict:
    tables = {}
    for suite in SUITES:
        card = json.loads((eval_dir / suite / "scores.json").read_text())
        names = [m["name"] for m in card["models"]]
        roles = dict(zip(names, ROLES))
        table = {}
        for name, per in card["scores"].items():
            task_metrics = {k.split("/", 1)[1]: v for k, v in per.items()}
            table[roles[name]] = {m: task_metrics.get(m) for m in METRICS}
        tables[suite] = {"scores": table, "seconds": card.get("seconds", {}),
                         "models": {roles[n]: m["path"] for n, m in zip(names, card["models"])}}
    return tables


def add_extra(tables: dict, role: str, eval_dir: Path) -> None:
    """A one-model scorecard per suite under eval_dir (e.g. the router-trained MoE) as a column."""
    for suite in SUITES:
        card = json.loads((eval_dir / suite / "scores.json").read_text())
        (name, per), = card["scores"].items()
        task_metrics = {k.split("/", 1)[1]: v for k, v in per.items()}
        tables[suite]["scores"][role] = {m: task_metrics.get(m) for m in METRICS}
        tables[suite]["models"][role] = card["models"][0]["path"]
        tables[suite]["seconds"][role] = card.get("seconds", {}).get(name)
    EXTRA_ROLES.append(role)


def check_aim(tables: dict, moe: str = "moe") -> dict:
    aim = {}
    for metric in ("exact_match", "contains", "rouge_l", "chrf"):
        res = {}
        for suite, expert in SUITES.items():
            s = tables[suite]["scores"]
            if moe not in s:
                continue
            if expert:
                e, m = s[expert][metric], s[moe][metric]
                ratio = (m / e) if e else None
                res[suite] = {"expert": e, "moe": m, "ratio": ratio,
                              "ok": bool(e == 0 and m == 0) or (ratio is not None and ratio >= 0.95)}
            else:
                best = max(s[x][metric] for x in ("expert-geo", "expert-units", "expert-verdict"))
                res[suite] = {"best_expert": best, "moe": s[moe][metric], "ok": s[moe][metric] > best}
        res["all_ok"] = all(v["ok"] for v in res.values())
        aim[metric] = res
    return aim


def markdown(tables: dict, metric: str) -> str:
    roles = [r for r in dict.fromkeys(ROLES + EXTRA_ROLES) if any(r in t["scores"] for t in tables.values())]
    lines = [f"| suite ({metric}) | " + " | ".join(roles) + " |", "|---" * (len(roles) + 1) + "|"]
    for suite, t in tables.items():
        cells = [f"{t['scores'][r][metric]:.2f}" if r in t["scores"] else "-" for r in roles]
        lines.append(f"| {suite} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-dir", default="out/moe-demo-eval")
    ap.add_argument("--seconds", default="{}", help="JSON: wall seconds per stage")
    ap.add_argument("--out", default="bench/results/moe_demo.json")
    ap.add_argument("--extra", action="append", default=[], metavar="ROLE=DIR",
                    help="another MoE variant's scorecards (one model per suite), e.g. moe+router=out/eval-router")
    a = ap.parse_args()
    tables = load(Path(a.eval_dir))
    for spec in a.extra:
        role, _, d = spec.partition("=")
        add_extra(tables, role, Path(d))
    result = {"machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores (shared), fp32",
              "stage_seconds": json.loads(a.seconds), "suites": tables, "aim": check_aim(tables)}
    variants = [r for r in dict.fromkeys(["moe+router"] + EXTRA_ROLES) if r in tables["moe-mixed"]["scores"]]
    result["aim_variants"] = {r: check_aim(tables, r) for r in variants}
    for r in variants:
        print(f"{r}: " + "; ".join(f"{m}: {'MET' if v['all_ok'] else 'not met'}" for m, v in result["aim_variants"][r].items()))
    old = Path(a.out)
    if old.is_file():  # keep hand-written fields (commands, notes) across re-runs
        prev = json.loads(old.read_text())
        for k in ("commands", "notes", "recipes"):
            if k in prev:
                result[k] = prev[k]
    old.parent.mkdir(parents=True, exist_ok=True)
    old.write_text(json.dumps(result, indent=2) + "\n")
    for metric in ("contains", "exact_match"):
        print(markdown(tables, metric), "\n")
    for metric, res in result["aim"].items():
        print(f"aim on {metric}: {'MET' if res['all_ok'] else 'NOT met'}  " +
              ", ".join(f"{s}: {'ok' if v['ok'] else 'no'}" for s, v in res.items() if s != "all_ok"))


if __name__ == "__main__":
    main()
