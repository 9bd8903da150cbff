#!/usr/bin/env bash
# The MoE demo of issue 7 section 6, end to end on CPU (docs/moe.md has the results):
#   three SmolLM2-135M specialists (LoRA) -> `finetune moe` -> [router training] -> `finetune eval`
# on each task's held-out suite and on the mixed suite, with base, each expert and the MoE as columns.
#
#   bash bench/moe_demo.sh                 # everything (stages: experts moe router eval report collect)
#   STAGES="eval collect" bash bench/moe_demo.sh   # re-run some stages only
#   ROUTER=0 bash bench/moe_demo.sh        # skip router training (recipes/moe-router.yaml)
#   STEPS=30 bash bench/moe_demo.sh        # override the experts' train.max_steps
#
# Outputs under out/: moe-expert-*/ (adapters), moe-demo/ (the MoE), moe-demo-router/ (router
# adapter), moe-demo-eval/<suite>/ (scorecards); logs in out/moe-demo-logs/; the summary goes to
# bench/results/moe_demo.json. Set PAR=0 to train the experts one after the other.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
FT="$PY -m finetune.cli"
STAGES=${STAGES:-"experts moe router eval report collect"}
TASKS="geo units verdict"
LOGS=out/moe-demo-logs
mkdir -p "$LOGS"
has() { [[ " $STAGES " == *" $1 "* ]]; }
stamp() { date +%s; }
T0=$(stamp)
declare -A SECS

if has experts; then
  t=$(stamp)
  steps=${STEPS:+train.max_steps=$STEPS}
  if [[ "${PAR:-1}" == 1 ]]; then
    # One thread each: on a small shared CPU three single-threaded runs finish sooner than three
    # two-threaded runs in a row (the per-step work of a 135M model scales poorly past one core).
    pids=()
    for task in $TASKS; do
      OMP_NUM_THREADS=1 $FT recipe=moe-expert-$task overwrite=true $steps > "$LOGS/train-$task.log" 2>&1 &
      pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
  else
    for task in $TASKS; do $FT recipe=moe-expert-$task overwrite=true $steps > "$LOGS/train-$task.log" 2>&1; done
  fi
  SECS[experts]=$(( $(stamp) - t ))
  echo "experts trained in ${SECS[experts]} s"
fi

if has moe; then
  t=$(stamp)
  $FT moe config=examples/moe-demo.yaml out_dir=out/moe-demo overwrite=true 2>&1 | tee "$LOGS/moe.log"
  SECS[moe]=$(( $(stamp) - t ))
fi

MOE=out/moe-demo
if [[ " $STAGES " != *" router "* && -d out/moe-demo-router/final && "${ROUTER:-1}" == 1 ]]; then
  MOE_ROUTER=out/moe-demo-router/final  # evaluate an earlier router run too
fi
if has router && [[ "${ROUTER:-1}" == 1 ]]; then
  t=$(stamp)
  OMP_NUM_THREADS=1 $FT recipe=moe-router model.name=out/moe-demo overwrite=true > "$LOGS/router.log" 2>&1
  SECS[router]=$(( $(stamp) - t ))
  MOE_ROUTER=out/moe-demo-router/final
fi

if has eval; then
  t=$(stamp)
  models="base,out/moe-expert-geo/final,out/moe-expert-units/final,out/moe-expert-verdict/final,$MOE"
  # The suites in parallel, one thread each: on a loaded 2-core machine a two-threaded eval spent
  # ~10x the CPU time of a one-threaded one (threads waiting on each other). The router adapter
  # sits on the MoE, not on the base, so `finetune eval` takes it in a run of its own.
  pids=()
  for suite in moe-geo moe-units moe-verdict moe-mixed; do
    OMP_NUM_THREADS=1 $FT eval suite=$suite "models=[$models]" out_dir=out/moe-demo-eval/$suite overwrite=true \
      progress=false > "$LOGS/eval-$suite.log" 2>&1 &
    pids+=($!)
    if [[ -n "${MOE_ROUTER:-}" ]]; then
      OMP_NUM_THREADS=1 $FT eval suite=$suite "models=[$MOE_ROUTER]" out_dir=out/moe-demo-eval-router/$suite \
        overwrite=true progress=false > "$LOGS/eval-router-$suite.log" 2>&1 &
      pids+=($!)
    fi
  done
  for p in "${pids[@]}"; do wait "$p"; done
  SECS[eval]=$(( $(stamp) - t ))
fi

if has report; then  # per-layer expert utilisation on the mixed held-out prompts (JSON + PNG heatmap)
  $FT moe report=$MOE data=eval/data/moe-mixed.jsonl out_dir=out/moe-demo-eval/routing overwrite=true \
    > "$LOGS/report.log" 2>&1
fi

if has collect; then
  secs=""
  for k in "${!SECS[@]}"; do secs="$secs\"$k\": ${SECS[$k]}, "; done
  extra=()
  [[ -f out/moe-demo-eval-router/moe-mixed/scores.json ]] && extra=(--extra moe+router=out/moe-demo-eval-router)
  $PY bench/moe_demo_collect.py --eval-dir out/moe-demo-eval --seconds "{${secs%, }}" "${extra[@]}" \
    --out bench/results/moe_demo.json
fi
echo "total $(( $(stamp) - T0 )) s"
