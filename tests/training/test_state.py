"""The run's resumable state: the one resume decision against out_dir, and the RNG a checkpoint
carries (restored, the run continues with the same random draws)."""

from __future__ import annotations

import io
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.errors import UsageError
from finetune.training import checkpoint as ck
from finetune.training.state import RESUME_HINT, capture_rng, resume_source, restore_rng
from tiny_peft import make_model


@pytest.fixture(scope="module")
def model():
    return make_model()


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _save(path: Path, model, step=None):
    return ck.save_checkpoint(path, model=model, config_yaml="", state=None if step is None else {"step": step})


# --------------------------------------------------------------------------- resume=no


def test_resume_no_refuses_a_nonempty_out_dir_and_touches_nothing(tmp_path):
    run = tmp_path / "earlier-run"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "metrics.csv").write_text("step,loss\n")
    with pytest.raises(UsageError) as e:
        resume_source(run, "no", False)
    assert str(e.value) == f"out_dir {run} is not empty; {RESUME_HINT}"
    assert RESUME_HINT.startswith("pass resume=auto to continue or overwrite=true to start a new run there")
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "x.bin").write_bytes(b"\x00\x01")
    before = _snapshot(out)
    # a run trains only into a run's own folder: user files there are named (resume/overwrite
    # would not help, so they are not suggested), never replaced
    for overwrite in (False, True):
        with pytest.raises(UsageError, match="holds files finetune did not write: notes.txt, sub; move them away"):
            resume_source(out, "no", overwrite)
    assert _snapshot(out) == before
    assert resume_source(tmp_path / "missing", "no", False) is None
    assert not (tmp_path / "missing").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="exists and is not a directory"):
        resume_source(tmp_path / "file", "no", True)


# --------------------------------------------------------------------------- resume=auto


def test_resume_auto_picks_final_then_the_newest_complete_step(tmp_path, model):
    out = tmp_path / "run"
    assert resume_source(out, "auto", False) is None  # nothing there yet: step 0
    out.mkdir()
    (out / "logs").mkdir()  # killed before the first checkpoint
    assert resume_source(out, "auto", False) is None
    p3 = _save(ck.step_dir(out, 3), model, step=3)
    (out / "step-000004").mkdir()  # an interrupted save is never a candidate
    assert resume_source(out, "auto", False) == p3
    final = _save(out / "final", model)
    assert resume_source(out, "auto", False) == final  # complete: nothing left to train


def test_resume_auto_finishes_an_interrupted_replace(tmp_path, model):
    out = tmp_path / "run"
    p = _save(ck.step_dir(out, 2), model, step=2)
    # A kill between "rename old aside" and "rename new in": only the hidden old copy is left.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    p.rename(out / f".old-step-000002.{ck._host()}.{dead.pid}.deadbeef")
    assert resume_source(out, "auto", False) == p and ck.is_complete(p)


# --------------------------------------------------------------------------- resume=PATH


def test_resume_path_must_be_a_complete_resumable_checkpoint(tmp_path, model):
    out = tmp_path / "run"
    p = _save(ck.step_dir(out, 3), model, step=3)
    assert resume_source(out, str(p), False) == p
    adapter_only = _save(out / "final", model)
    with pytest.raises(UsageError, match="no training_state.pt"):
        resume_source(out, str(adapter_only), False)
    (out / "step-000004").mkdir()
    with pytest.raises(UsageError, match="is not a complete checkpoint directory"):
        resume_source(out, str(out / "step-000004"), False)


def test_resume_path_into_another_nonempty_out_dir_is_refused(tmp_path, model):
    p = _save(ck.step_dir(tmp_path / "run", 3), model, step=3)
    # Resuming another run's checkpoint into a third, non-empty folder would mix two runs.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "f").write_text("x")
    with pytest.raises(UsageError, match="is not empty; .* is not one of its checkpoints"):
        resume_source(elsewhere, str(p), False)
    with pytest.raises(UsageError, match="holds files finetune did not write: f;"):  # user files
        resume_source(elsewhere, str(p), True)
    (elsewhere / "f").unlink()
    (elsewhere / "logs").mkdir()  # another run's folder, overwrite=true: allowed
    assert resume_source(elsewhere, str(p), True) == p
    assert resume_source(tmp_path / "fresh", str(p), False) == p


# --------------------------------------------------------------------------- RNG


def test_rng_roundtrip_through_weights_only_file():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    random.gauss(0, 1)
    state = capture_rng()
    expect = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
              torch.rand(3).tolist(), torch.randn(2).tolist())
    buf = io.BytesIO()
    torch.save({"rng": state}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["rng"]
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng(loaded)
    got = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
           torch.rand(3).tolist(), torch.randn(2).tolist())
    assert got == expect
