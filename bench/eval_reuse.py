"""Benchmark: `finetune eval` of N adapters on one base, loading the base once vs once per adapter.

N seeded random LoRA adapters (r=16, every linear layer) on SmolLM2-135M-Instruct (the embedded
copy) are scored on the `tiny` suite, first in one run (the base is loaded once and each adapter
is swapped onto it), then one run per checkpoint (what eval did before: a fresh base each time).
Records base loads, seconds spent loading weights, total seconds, and whether the scores match
exactly. At 135M a load takes about a second; at 7B it takes minutes, and that is what is saved.

    python bench/eval_reuse.py [--adapters 3] [--n 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))  # tiny_peft.random_lora_adapter
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common import cpu_model, versions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=3)
    ap.add_argument("--n", type=int, default=4, help="rows per task")
    args = ap.parse_args()

    import finetune.models.adapters as adapters
    from finetune.eval import evaluate
    from finetune.models.load import resolve_model_path
    from tiny_peft import random_lora_adapter

    loads: list[float] = []
    real = adapters.load_pretrained

    def timed(path, **kw):
        t0 = time.perf_counter()
        model = real(path, **kw)
        loads.append(time.perf_counter() - t0)
        return model

    adapters.load_pretrained = timed
    base = str(resolve_model_path("smollm2-135m"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = [str(random_lora_adapter(tmp / f"a{i}" / "final", base, seed=i, r=16, alpha=32, scale=0.05))
                 for i in range(args.adapters)]
        models = ["base", *paths]
        result = {"command": " ".join(["python", *sys.argv]), "adapters": args.adapters, "rows_per_task": args.n}
        for mode in ("shared", "separate"):
            loads.clear()
            t0 = time.perf_counter()
            if mode == "shared":
                scores = evaluate("tiny", models, tmp / "shared", n=args.n, device="cpu", show=False)["scores"]
            else:
                scores = {}
                for i, m in enumerate(models):  # one checkpoint per run: its own base load
                    card = evaluate("tiny", [base if m == "base" else m], tmp / f"s{i}", n=args.n, device="cpu",
                                    show=False)
                    (only,) = card["scores"].values()
                    scores["base" if m == "base" else card["models"][0]["name"]] = only
            result[mode] = {"base_loads": len(loads), "load_s": round(sum(loads), 2),
                            "total_s": round(time.perf_counter() - t0, 2)}
            result[f"{mode}_scores"] = scores
    shared, separate = result.pop("shared_scores"), result.pop("separate_scores")
    result["scores_identical"] = all(shared[k] == separate[k] for k in shared)
    result["load_average"] = os.getloadavg()
    result["cpu"], result["versions"] = cpu_model(), versions(["torch", "transformers", "peft"])
    out = ROOT / "bench" / "results" / "eval_reuse.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    s, p = result["shared"], result["separate"]
    print(f"{args.adapters} adapters + base: shared base {s['base_loads']} load(s) {s['load_s']} s, total {s['total_s']} s; "
          f"separate {p['base_loads']} loads {p['load_s']} s, total {p['total_s']} s; "
          f"scores identical: {result['scores_identical']}  -> {out}")


if __name__ == "__main__":
    main()
