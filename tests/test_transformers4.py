"""transformers 4.57 loads finetune's adapter (with tokenizer), merged model and MoE with transformers
5's logits (fp32, 1e-4): bench/transformers4_check.py, which builds its own 4.57 venv (pip, once)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_outputs_load_under_transformers_4(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "transformers4_check.py"), "--work", str(tmp_path)],
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert res.stdout.count(" OK") == 3
