"""Benchmark: data preparation on an Alpaca-size set (52k rows), cold and from the cache.

The 1,000 shared Alpaca rows (../shared/data) are replicated 52 times with varied text (each copy
gets its own numbered wording and word order), so no two rows are identical. Measures
`finetune.data.pipeline.prepare` end to end (read, convert, tokenize + mask in a process pool,
pack, write the cache), then again from the cache, on the tiny byte tokenizer and on SmolLM2's
49k-vocab tokenizer (via finetune.models.load, when it loads). Targets: <= 30 s cold on 2 cores,
<= 3 s cached.

    python bench/data_prep.py [--rows 52000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
SHARED = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_cleaned_1000.json"


def make_rows(n: int) -> list[dict]:
    base = json.loads(SHARED.read_text())
    rng = random.Random(0)
    rows = []
    for k in range(n):
        r = base[k % len(base)]
        copy = k // len(base)
        words = r["output"].split(" ")
        if copy and len(words) > 3:  # vary the text: rotate the words of each later copy
            cut = rng.randrange(1, len(words))
            words = words[cut:] + words[:cut]
        rows.append({"instruction": f"({copy}) {r['instruction']}", "input": r["input"], "output": " ".join(words)})
    return rows


def tokenizers():
    from finetune.models.tiny import byte_tokenizer

    yield "tiny-byte (259)", byte_tokenizer()
    try:
        from finetune.config import ModelConfig
        from finetune.models.load import load_tokenizer

        tok = load_tokenizer(ModelConfig(name="smollm2-135m"))
        yield f"smollm2-135m ({len(tok)})", tok
    except Exception as e:  # no embedded model on this machine: report and go on
        print(f"skipping the 49k tokenizer: {e}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=52_000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "data_prep.json"))
    a = ap.parse_args()
    if not SHARED.is_file():
        sys.exit(f"bench needs {SHARED}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "alpaca52k.json"
        data.write_text(json.dumps(make_rows(a.rows)))
        from finetune.config import DataConfig
        from finetune.data.pipeline import prepare

        results = []
        for name, tok in list(tokenizers()):  # load before FINETUNE_CACHE moves to the temp dir
            os.environ["FINETUNE_CACHE"] = str(Path(tmp) / f"cache-{len(results)}")
            cfg = DataConfig(path=str(data), format="alpaca", seq_len=2048, val_fraction=0.01)
            t0 = time.perf_counter()
            cold = prepare(cfg, tok, seed=42, progress=False)
            t_cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            warm = prepare(cfg, tok, seed=42, progress=False)
            t_warm = time.perf_counter() - t0
            assert warm.stats.cached and len(warm.train) == len(cold.train)
            s = cold.stats
            results.append({"tokenizer": name, "cold_s": round(t_cold, 2), "cached_s": round(t_warm, 2),
                            "rows": s.rows_loaded, "examples": s.examples, "tokens": s.tokens,
                            "units": s.units, "packing_efficiency": round(s.packing_efficiency, 4),
                            "dropped": s.dropped})
    import datasets
    import tokenizers as tk_lib
    import transformers

    record = {
        "command": "python bench/data_prep.py --rows " + str(a.rows),
        "hardware": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                     "platform": platform.platform()},
        "versions": {"python": platform.python_version(), "transformers": transformers.__version__,
                     "tokenizers": tk_lib.__version__, "datasets": datasets.__version__},
        "targets": {"cold_s": 30, "cached_s": 3},
        "results": results,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(record, indent=1) + "\n")
    print("data_prep: " + "; ".join(f"{r['tokenizer']}: {r['rows']:,} rows, {r['tokens']:,} tokens, "
                                    f"cold {r['cold_s']} s, cached {r['cached_s']} s" for r in results)
          + f" ({os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
