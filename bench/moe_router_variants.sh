#!/usr/bin/env bash
# Router-training variants of the MoE demo (docs/moe.md, "Router variants"), on the MoE and experts
# that bench/moe_demo.sh wrote under out/ (run its stages "experts moe" first):
#
#   bash bench/moe_router_variants.sh                     # every variant below, geo suite only
#   VARIANTS="experts-lora" SUITES="moe-geo moe-units" bash bench/moe_router_variants.sh
#
# Each variant is recipes/moe-router.yaml plus CLI overrides, trained into
# out/moe-router-var/NAME and evaluated (one model per run) into out/moe-router-var-eval/NAME/SUITE.
# A "gates-*" variant first rebuilds the MoE with another gate_mode (examples/moe-demo.yaml with
# that one key changed, written to out/moe-demo-GATE.yaml) into out/moe-demo-GATE.
# Set PAR=1 to train the variants at the same time (one thread each).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
FT="$PY -m finetune.cli"
LOGS=out/moe-demo-logs
mkdir -p "$LOGS"
SUITES=${SUITES:-moe-geo}
NO_EXPERT_LORA="lora.target_parameters=[]"
declare -A OVR=(
  [qv-20]="$NO_EXPERT_LORA"                                    # routers + q/v LoRA (the recipe before the expert LoRA)
  [qv-40]="$NO_EXPERT_LORA train.max_steps=40"                 # more router steps
  [experts-lora]=""                                            # recipes/moe-router.yaml: + LoRA r 8 on every expert's MLP
  [experts-lora-only]="lora.target_modules=[]"                 # routers + expert LoRA, no attention LoRA
  [experts-lora-40]="train.max_steps=40"
  [gates-random]=""                                            # random gates, then the recipe's training
  [gates-cheap_embed]=""
)
VARIANTS=${VARIANTS:-"qv-20 experts-lora qv-40 gates-random"}

moe_for() {  # the MoE a variant trains on (built here for gates-* variants)
  local v=$1
  if [[ $v == gates-* ]]; then
    local gate=${v#gates-} dir=out/moe-demo-${v#gates-}
    if [[ ! -f $dir/config.json ]]; then
      sed -e "s/^gate_mode: .*/gate_mode: $gate/" -e "s#adapter: \.\./out/#adapter: #" examples/moe-demo.yaml \
        > out/moe-demo-$gate.yaml
      $FT moe config=out/moe-demo-$gate.yaml out_dir=$dir overwrite=true > "$LOGS/moe-$gate.log" 2>&1
    fi
    echo "$dir"
  else
    echo out/moe-demo
  fi
}

train() {
  local v=$1 moe
  moe=$(moe_for "$v")
  # shellcheck disable=SC2086  # the overrides are words
  OMP_NUM_THREADS=1 $FT recipe=moe-router model.name=$moe out_dir=out/moe-router-var/$v overwrite=true \
    ${OVR[$v]} > "$LOGS/router-var-$v.log" 2>&1
}

evaluate() {
  local v=$1 s
  for s in $SUITES; do
    OMP_NUM_THREADS=1 $FT eval suite=$s "models=[out/moe-router-var/$v/final]" \
      out_dir=out/moe-router-var-eval/$v/$s overwrite=true progress=false > "$LOGS/eval-var-$v-$s.log" 2>&1
  done
}

pids=()
for v in $VARIANTS; do
  [[ -v "OVR[$v]" ]] || { echo "unknown variant $v (known: ${!OVR[*]})" >&2; exit 2; }
  if [[ "${PAR:-0}" == 1 ]]; then (train "$v" && evaluate "$v") & pids+=($!); else train "$v"; evaluate "$v"; fi
done
for p in "${pids[@]}"; do wait "$p"; done
$PY - "$SUITES" $VARIANTS <<'EOF'
import json, sys
suites = sys.argv[1].split()
for v in sys.argv[2:]:
    cells = []
    for s in suites:
        try:
            sc = json.load(open(f"out/moe-router-var-eval/{v}/{s}/scores.json"))
            per = next(iter(sc["scores"].values()))  # one model per scorecard
            m = {k.split("/", 1)[1]: x for k, x in per.items()}
            cells.append(f"{s} {m['exact_match']:.1f}/{m['contains']:.1f}")
        except (OSError, KeyError, StopIteration) as e:
            cells.append(f"{s} ? ({e})")
    print(v, *cells, sep=" | ")
EOF
