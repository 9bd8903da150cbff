#!/usr/bin/env bash
# Set up (idempotent) and run the demo on the embedded default model, on CPU:
# fine-tune SmolLM2-135M-Instruct on the self-made Veloran Isles data, then compare answers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
out=${DEMO_OUT:-out/demo}
if [ -f "$out/final/COMPLETE" ]; then
  echo "demo adapter already trained in $out/final (delete $out to train again)"
else
  finetune recipe=demo out_dir="$out" resume=auto
fi
python -m finetune.demo "$out/final"
