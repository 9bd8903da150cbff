#!/usr/bin/env bash
# Set up (idempotent) and run the demo on the embedded default model, on CPU: fine-tune
# SmolLM2-135M-Instruct on self-made facts about the fictional Veloran Isles, score base vs adapter
# on held-out questions, and show their answers side by side. A second run reuses what is done.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
out=${DEMO_OUT:-out/demo}
if [ ! -f "$out/final/COMPLETE" ]; then
  finetune recipe=demo out_dir="$out" resume=auto       # trains, then scores suite `demo` into $out/eval
fi
if [ ! -f "$out/eval/scores.json" ]; then
  finetune eval suite=demo recipe=demo models="[base,$out/final]" out_dir="$out/eval"
fi
python scripts/show_demo.py "$out"
