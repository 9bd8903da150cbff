#!/usr/bin/env bash
# The CPU preference demo: the SFT demo's model (SmolLM2-135M-Instruct + the Veloran Isles adapter,
# scripts/demo.sh) is merged, then trained by DPO on 64 self-made pairs (recipe demo-dpo: Veloran
# paint is sea-coloured), and held-out pairs are scored for base, SFT and DPO. A second run reuses
# what is done.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
out=${DEMO_OUT:-out/demo}
if [ ! -f "$out/final/COMPLETE" ]; then
  finetune recipe=demo out_dir="$out" resume=auto eval.suite=null   # the SFT demo adapter
fi
if [ ! -f "$out/merged/config.json" ]; then
  finetune merge adapter="$out/final" out_dir="$out/merged"
fi
if [ ! -f "$out/dpo/final/COMPLETE" ]; then
  finetune recipe=demo-dpo model.name="$out/merged" out_dir="$out/dpo" resume=auto
fi
python scripts/pref_demo.py "$out"
