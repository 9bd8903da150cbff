#!/usr/bin/env bash
# The project's one-call device check: bench/gpu_check.py's parts (env + bitsandbytes on the GPU,
# the planner, Llama-2-7B-shape QLoRA through our trainer, the fair and the independent HF
# baselines; then, as time allows, Liger off (vs the default auto), train.compile=layers and
# activation offload), <= 330 s of work by default so a second call
# still fits a 15-minute device allowance; summary.json rewritten after every part. See bench/README.md ("GPU: the one-call device check").
#
#   bash bench/gpu_check.sh              # on the GPU machine, from anywhere in the repo
#   bash bench/gpu_check.sh --cpu-smoke  # every part on a tiny shape on the CPU (the default tests run it)
#
# Env: GPU_CHECK_OUT (results dir, default bench/results/gpu-check, or $OUT/gpu-check when the
# device tool's $OUT is set), GPU_CHECK_BUDGET_S (330: the whole run; give the tool's timeout_s
# >= budget + 60), GPU_CHECK_WHEELS (wheels to install first, default .gpucheck/whl when present),
# GPU_CHECK_PYTHON (default .venv/bin/python when present, else python3).
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
SMOKE=()
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=(--cpu-smoke)
PY="${GPU_CHECK_PYTHON:-}"
[ -z "$PY" ] && { [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; }
DEFAULT_OUT=bench/results/gpu-check
[ -n "${OUT:-}" ] && DEFAULT_OUT="$OUT/gpu-check"
RESULTS="${GPU_CHECK_OUT:-$DEFAULT_OUT}"
[ ${#SMOKE[@]} -gt 0 ] && RESULTS="${GPU_CHECK_OUT:-$(mktemp -d)/gpu-check}"
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# Wheels the GPU image lacks (bitsandbytes, jsonargparse...), carried in: bash bench/fetch_wheels.sh
WHL="${GPU_CHECK_WHEELS:-.gpucheck/whl}"
if [ ${#SMOKE[@]} -eq 0 ] && ls "$WHL"/*.whl >/dev/null 2>&1; then
  SITE=/tmp/gpucheck-site
  timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHL"/*.whl || { echo "FATAL: wheel install from $WHL failed"; exit 3; }
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi

# The random 7B checkpoints (13.5 GB each, two at the peak) go to RAM when /dev/shm has room.
if [ -z "${GPU_CHECK_CACHE:-}" ]; then
  GPU_CHECK_CACHE=/tmp/gpucheck-cache
  SHM_FREE=$(df -B1 --output=avail /dev/shm 2>/dev/null | tail -1 | tr -d ' ')
  if [ -n "$SHM_FREE" ] && [ "$SHM_FREE" -gt $((40 * 1024 * 1024 * 1024)) ] 2>/dev/null; then
    GPU_CHECK_CACHE=/dev/shm/gpucheck-cache
  fi
fi
export GPU_CHECK_CACHE

echo "== gpu_check $(date -u +%FT%TZ) repo=$REPO results=$RESULTS cache=$GPU_CHECK_CACHE ${SMOKE[*]:-}"
"$PY" bench/gpu_check.py --out "$RESULTS" "${SMOKE[@]}" 2>&1 | tee -a "$RESULTS/log.txt"
rc=${PIPESTATUS[0]}
[ "$GPU_CHECK_CACHE" = /dev/shm/gpucheck-cache ] && rm -rf /dev/shm/gpucheck-cache
echo "== gpu_check rc=$rc; files in $RESULTS: $(ls "$RESULTS" | tr '\n' ' ')"
exit "$rc"
