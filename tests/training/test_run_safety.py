"""Never lose a run (docs/bad-input.md, "Runs, outputs and resume"), through the CLI:

- one run per out_dir: a second run is refused naming the holder, before any data or model loads;
  the lock dies with its process (kill -9 too);
- Ctrl-C / SIGTERM after the last step (final validation, final save) leaves a checkpoint that
  resume=auto finishes, with the resume hint and exit 130 / 143;
- resume compares the checkpoint's config: adapter-defining changes are refused naming the
  fields; schedule changes apply from the resume step and are recorded; a larger max_steps
  continues past final/;
- a merge killed with SIGTERM leaves no temp dir, and a dead writer's temp dir is swept.

The signals are sent by the process to itself at a known point (a patched function), so these run
in this process in seconds; real kills mid-step are tests/training/test_faults.py's.
"""

from __future__ import annotations

import csv
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_bad_input import expect_error, run_cli, snapshot
from finetune import fs
from finetune.data import pipeline
from finetune.training import checkpoint, loop

QUIET = ["output.progress=false", "output.plot=false", "data.cache=false"]


def args(out: Path, *extra: str) -> list[str]:
    return ["recipe=tiny-lora", f"out_dir={out}", *QUIET, *extra]


def weights(path: Path) -> dict:
    return load_file(str(path / checkpoint.ADAPTER_WEIGHTS))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- one run per out_dir


def test_second_run_into_a_locked_out_dir_is_refused_naming_the_holder(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from finetune.fs import out_dir_lock\n"
         "with out_dir_lock(sys.argv[1]):\n print('locked', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr(pipeline, "prepare", lambda *a, **k: pytest.fail("data prepared under another run's lock"))
        for extra in ([], ["resume=auto"], ["overwrite=true"]):
            err = expect_error(args(out, *extra), 2, f"out_dir {out} is in use by another run (pid {holder.pid} on ",
                               "started ", "wait for it to end or choose another out_dir",
                               capsys=capsys, root=tmp_path)
            assert "UTC" in err
    finally:
        holder.kill()  # kill -9: the kernel drops the lock with the process
        holder.wait()
    with fs.out_dir_lock(out):
        pass


def test_the_lock_is_held_through_the_run_and_gone_after(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    seen = []
    real_prepare = pipeline.prepare

    def prepare(*a, **k):  # a second opener (another process, as far as flock is concerned) is refused
        fd = os.open(out / fs.LOCK_NAME, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append(Path(f"/proc/self/fd/{fd}").exists())
        finally:
            os.close(fd)
        return real_prepare(*a, **k)

    monkeypatch.setattr(pipeline, "prepare", prepare)
    rc, _, err = run_cli(args(out, "train.max_steps=1", "train.warmup_steps=1"), capsys)
    assert rc == 0, err
    assert seen == [True]
    assert not (out / fs.LOCK_NAME).exists()  # a finished run leaves only its outputs


def test_nested_locks_in_one_process_share_it(tmp_path):
    with fs.out_dir_lock(tmp_path / "r"), fs.out_dir_lock(tmp_path / "r"):
        assert (tmp_path / "r" / fs.LOCK_NAME).exists()
    assert not (tmp_path / "r").exists()  # created for the lock and left empty: removed


# --------------------------------------------------------------------------- Ctrl-C / SIGTERM after the last step


def _signal_when(monkeypatch, module, name: str, sig: int, when) -> None:
    real = getattr(module, name)

    def patched(*a, **k):
        if when(*a, **k):
            os.kill(os.getpid(), sig)
        return real(*a, **k)

    monkeypatch.setattr(module, name, patched)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_final_validation_leaves_a_checkpoint_resume_finishes(tmp_path, capsys, monkeypatch, sig, code):
    out = tmp_path / "run"
    _signal_when(monkeypatch, loop, "_validate", sig,
                 lambda fabric, objective, lossmod, val, state, progress: state.step == 3)
    rc, stdout, err = run_cli(args(out, "train.max_steps=3"), capsys)
    assert rc == code, err
    name = signal.Signals(sig).name
    assert f"{name} received: saved {out / 'step-000003'} at step 3" in stdout
    assert "Resume with the same command plus resume=auto." in stdout
    assert not (out / "final").exists() and checkpoint.is_complete(out / "step-000003")
    monkeypatch.undo()
    rc, stdout, err = run_cli(args(out, "train.max_steps=3", "resume=auto"), capsys)
    assert rc == 0, err
    assert f"resumed from {out / 'step-000003'} at step 3" in stdout
    assert checkpoint.saved_step(out / "final") == 3
    assert same(weights(out / "final"), weights(out / "step-000003"))


def test_sigterm_during_the_final_save_keeps_a_complete_final(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _signal_when(monkeypatch, checkpoint, "save_checkpoint", signal.SIGTERM, lambda path, **k: Path(path).name == "final")
    rc, stdout, err = run_cli(args(out, "train.max_steps=2"), capsys)
    assert rc == 143, err
    assert f"SIGTERM received: the final adapter {out / 'final'} is complete." in stdout
    assert checkpoint.is_complete(out / "final")
    monkeypatch.undo()
    rc, stdout, _ = run_cli(args(out, "train.max_steps=2", "resume=auto"), capsys)
    assert rc == 0 and "is already complete (2 steps); nothing to resume" in stdout


# --------------------------------------------------------------------------- resume against the saved config


@pytest.fixture
def finished(tmp_path, capsys):
    """A run finished at step 2 (lr 0.003, r 8): its out_dir."""
    out = tmp_path / "run"
    rc, _, err = run_cli(args(out, "train.max_steps=2"), capsys)
    assert rc == 0, err
    return out


@pytest.mark.parametrize("change, named", [
    (["lora.r=4"], "lora.r 8 -> 4"),
    (["lora.target_modules=[q_proj]"], "lora.target_modules ['all-linear'] -> ['q_proj']"),
    (["data.seq_len=128", "train.seed=1"], "data.seq_len 256 -> 128; train.seed 42 -> 1"),
])
def test_resume_with_a_changed_adapter_setting_is_refused_naming_it(finished, capsys, change, named):
    expect_error(args(finished, "train.max_steps=4", "resume=auto", *change), 2,
                 f"resume from {finished / 'final'}: changed settings that define the adapter: {named}",
                 "resume with the checkpoint's values or train into a new out_dir",
                 capsys=capsys, root=finished.parent)


def test_resume_onto_another_base_model_is_refused(finished, capsys, tmp_path):
    from finetune.models.tiny import make_tiny_model

    other = make_tiny_model(tmp_path / "other-base", seed=1)  # same shape, other weights
    expect_error(args(finished, "train.max_steps=4", "resume=auto", f"model.name={other}"), 2,
                 f"model.name tiny -> {other}", capsys=capsys, root=finished)


def test_resume_applies_and_records_a_new_lr_and_a_larger_max_steps(finished, capsys):
    first = weights(finished / "final")
    rc, stdout, err = run_cli(args(finished, "train.max_steps=4", "train.lr=0.5", "resume=auto"), capsys)
    assert rc == 0, err
    assert "has 2 steps; continuing to train.max_steps=4" in stdout
    assert "applying changed schedule from step 2: train.max_steps 2 -> 4, train.lr 0.003 -> 0.5" in stdout
    assert checkpoint.saved_step(finished / "final") == 4
    assert not same(weights(finished / "final"), first)
    rows = list(csv.DictReader((finished / "logs" / "metrics.csv").open()))  # one history, appended
    lrs = {int(r["step"]): float(r["lr"]) for r in rows if r.get("lr")}
    # step 3 is the first after warmup (2) of the new 4-step cosine: the new peak lr, not 0.003's schedule
    assert lrs[3] == pytest.approx(0.5) and lrs[4] < 0.5
    text = (finished / "final" / "config.yaml").read_text()
    assert "  lr: 0.5\n" in text and "  max_steps: 4\n" in text
    assert "# resumed at step 2 with changed schedule: train.max_steps 2 -> 4, train.lr 0.003 -> 0.5" in text


def test_resume_without_changes_is_unchanged_and_unrecorded(finished, capsys):
    rc, stdout, _ = run_cli(args(finished, "train.max_steps=2", "resume=auto"), capsys)
    assert rc == 0 and "nothing to resume" in stdout and "applying" not in stdout
    assert "# resumed" not in (finished / "final" / "config.yaml").read_text()


# --------------------------------------------------------------------------- merge leftovers


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from tiny_peft import random_lora_adapter
    from finetune.models.tiny import tiny_model_dir

    return random_lora_adapter(tmp_path_factory.mktemp("adapter") / "a", tiny_model_dir(), r=4)


def test_sigterm_during_merge_leaves_no_temp_dir(tmp_path, capsys, monkeypatch, adapter):
    from finetune import merge

    _signal_when(monkeypatch, merge, "copy_tokenizer", signal.SIGTERM, lambda *a: True)
    before = snapshot(tmp_path)
    rc, _, _ = run_cli(["merge", f"adapter={adapter}", f"out_dir={tmp_path / 'merged'}"], capsys)
    assert rc == 143
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({Path(k).parts[0] for k in before})
    assert signal.getsignal(signal.SIGTERM) is not None


def test_merge_sweeps_a_dead_writers_temp_dir_and_keeps_a_live_one(tmp_path, capsys, adapter):
    dead = tmp_path / ".merged.tmp-k1ll3d"
    (dead / "sub").mkdir(parents=True)
    (dead / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1024)
    live = tmp_path / ".merged.tmp-4l1ve"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)  # held by "another merge" (flock: another open file description)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        rc, _, err = run_cli(["merge", f"adapter={adapter}", f"out_dir={tmp_path / 'merged'}"], capsys)
        assert rc == 0, err
        assert not dead.exists() and live.is_dir()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.tmp-") and p != live]
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- overwrite=true: one run per folder


def test_overwrite_moves_the_earlier_run_aside_and_resume_finds_only_the_new_one(tmp_path, capsys):
    """docs/bad-input.md R22: the earlier run's step-000003 must not be resumed into the new run."""
    out = tmp_path / "run"
    rc, _, err = run_cli(args(out, "train.max_steps=4", "train.save_every=1", "train.keep_last=5"), capsys)
    assert rc == 0, err
    old_final = weights(out / "final")
    rc, _, err = run_cli(args(out, "train.max_steps=2", "train.save_every=1", "train.seed=7", "overwrite=true"),
                         capsys)
    assert rc == 0, err
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and f"overwrite=true: moved the earlier run in {out} (" in err and str(aside[0]) in err
    assert sorted(p.name for p in out.iterdir()) == ["final", "logs", "step-000001"]
    assert same(weights(aside[0] / "final"), old_final)  # nothing deleted
    rows = list(csv.DictReader((out / "logs" / "metrics.csv").open()))
    assert max(int(float(r["step"])) for r in rows) == 2  # this run's history only
    rc, stdout, err = run_cli(args(out, "train.max_steps=2", "train.save_every=1", "train.seed=7", "resume=auto"),
                              capsys)
    assert rc == 0 and "is already complete (2 steps)" in stdout, err
