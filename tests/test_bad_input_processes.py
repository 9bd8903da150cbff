"""The bad-input matrix's acceptance rows as real processes (`python -m finetune.cli`): the same one
`error:` line, exit code and untouched files as the in-process rows of tests/test_bad_input.py, with
nothing of pytest's capture in between."""

from __future__ import annotations

import subprocess
import sys

from test_bad_input import ALPACA, REPO, snapshot, write_jsonl


def cli_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_acceptance_broken_jsonl_line_process(tmp_path):
    f = write_jsonl(tmp_path / "broken.jsonl", [ALPACA[0], ALPACA[1], '{"instruction": oops}', ALPACA[2]])
    r = cli_process("recipe=tiny-lora", f"data.path={f}", "data.format=alpaca", "data.strict=true",
                    f"out_dir={tmp_path / 'D2'}")
    assert r.returncode == 2
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "broken.jsonl line 3" in errors[0], r.stderr
    assert "Traceback" not in r.stderr


def test_acceptance_non_empty_out_dir_process(tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "a.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "b.bin").write_bytes(b"\x01\x02")
    before = snapshot(tmp_path)
    r = cli_process("recipe=tiny-lora", f"out_dir={out}", "train.max_steps=2")
    assert r.returncode == 2 and "holds files finetune did not write: a.txt, sub" in r.stderr
    assert "Traceback" not in r.stderr
    assert snapshot(tmp_path) == before
