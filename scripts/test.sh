#!/usr/bin/env bash
# Set up (idempotent) and run the default test suite: fast tests only, on all cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -n auto -q "$@"
