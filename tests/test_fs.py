"""finetune.fs: the out_dir rule, and writes that are complete or invisible."""

import logging
import os
import stat

import pytest

from finetune import fs
from finetune.errors import UsageError


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


# --------------------------------------------------------------------------- check_out_dir


def test_check_out_dir_refuses_non_empty_without_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(UsageError, match=f"out_dir {tmp_path} is not empty; pass overwrite=true"):
        fs.check_out_dir(tmp_path, overwrite=False)
    with pytest.raises(UsageError, match="is not empty; or resume=auto"):
        fs.check_out_dir(tmp_path, overwrite=False, hint="or resume=auto")
    assert fs.check_out_dir(tmp_path, overwrite=True) == tmp_path
    assert (tmp_path / "keep.txt").read_text() == "x"  # overwrite allows, never deletes


def test_check_out_dir_accepts_missing_or_empty_and_refuses_a_file(tmp_path):
    assert fs.check_out_dir(tmp_path / "new", overwrite=False) == tmp_path / "new"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    (tmp_path / "empty").mkdir()
    fs.check_out_dir(tmp_path / "empty", overwrite=False)
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="exists and is not a directory"):
        fs.check_out_dir(tmp_path / "f", overwrite=True)


# --------------------------------------------------------------------------- atomic_out_dir


def test_atomic_out_dir_removes_its_temp_dir_on_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with fs.atomic_out_dir(out, overwrite=False) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("boom")
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_atomic_out_dir_error_leaves_an_existing_out_dir_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("old")
    with pytest.raises(RuntimeError):
        with fs.atomic_out_dir(out, overwrite=True) as tmp:
            (tmp / "config.json").write_text("new")
            raise RuntimeError("boom")
    assert (out / "config.json").read_text() == "old"
    assert leftovers(tmp_path) == []


def test_atomic_out_dir_refuses_before_writing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    with pytest.raises(UsageError, match="is not empty"):
        with fs.atomic_out_dir(out, overwrite=False):
            pytest.fail("the block must not run")
    assert leftovers(tmp_path) == []


def test_atomic_out_dir_success_renames_into_place(tmp_path):
    out = tmp_path / "a" / "out"
    with fs.atomic_out_dir(str(out), overwrite=False) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"w")
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == [fs.OUTPUT_MARKER, "config.json", "sub"]
    assert leftovers(out.parent) == []
    # permissions as a plain mkdir gives them, not mkdtemp's 0700
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask


def test_atomic_out_dir_overwrite_replaces_the_folder_whole(tmp_path, caplog):
    """An earlier merge's model.safetensors must not stay beside the new shards (it would load first)."""
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "old.bin").write_bytes(b"old")
    (out / "config.json").write_text("old")
    (out / "model.safetensors").write_bytes(b"old weights")
    (out / fs.OUTPUT_MARKER).write_text('["config.json", "model.safetensors", "sub"]')
    with caplog.at_level(logging.WARNING, logger="finetune.fs"):
        with fs.atomic_out_dir(out, overwrite=True) as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "new.bin").write_bytes(b"new")
            (tmp / "config.json").write_text("new")
            (tmp / "model-00001-of-00002.safetensors").write_bytes(b"new")
    assert (out / "config.json").read_text() == "new"
    assert sorted(p.name for p in (out / "sub").iterdir()) == ["new.bin"]
    assert not (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.iterdir()) == [fs.OUTPUT_MARKER, "config.json",
                                                     "model-00001-of-00002.safetensors", "sub"]
    assert "replaced its earlier contents" in caplog.text
    assert leftovers(tmp_path) == []


def test_atomic_out_dir_overwrite_refuses_files_it_did_not_write(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("old")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="holds files finetune did not write: notes.txt; overwrite=true replaces"):
        with fs.atomic_out_dir(out, overwrite=True):
            pytest.fail("the block must not run")
    assert (out / "notes.txt").read_text() == "mine"
    # what an earlier finetune output listed as its own may be replaced, whatever its name
    with fs.atomic_out_dir(tmp_path / "b", overwrite=False) as tmp:
        (tmp / "notes.txt").write_text("written by the command")
    with fs.atomic_out_dir(tmp_path / "b", overwrite=True) as tmp:
        (tmp / "x.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [fs.OUTPUT_MARKER, "x.json"]


def test_atomic_out_dir_keeps_the_lock_of_the_command_holding_it(tmp_path):
    out = tmp_path / "out"
    with fs.out_dir_lock(out):
        with fs.atomic_out_dir(out, overwrite=False) as tmp:
            (tmp / "config.json").write_text("{}")
        assert (out / fs.LOCK_NAME).exists() and (out / "config.json").exists()
        with fs.atomic_out_dir(out, overwrite=True) as tmp:
            (tmp / "config.json").write_text("{2}")
        assert (out / "config.json").read_text() == "{2}"
    assert not (out / fs.LOCK_NAME).exists()


# --------------------------------------------------------------------------- check_out_file


def test_check_out_file_rules(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    with pytest.raises(UsageError, match="exists; pass overwrite=true"):
        fs.check_out_file(data, overwrite=False)
    with pytest.raises(UsageError, match=r"dump=.*data.jsonl is the dataset file"):
        fs.check_out_file(data, overwrite=True, inputs=[("dataset file", str(data))])
    with pytest.raises(UsageError, match="is inside the base model"):
        fs.check_out_file(tmp_path / "x.jsonl", overwrite=True, inputs=[("base model", str(tmp_path))])
    with pytest.raises(UsageError, match="is a folder"):
        fs.check_out_file(tmp_path, overwrite=True)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UsageError, match="not a regular file"):
        fs.check_out_file(tmp_path / "fifo", overwrite=True)
    with pytest.raises(UsageError, match="not a regular file"):
        fs.check_out_file("/dev/null", overwrite=True)
    assert fs.check_out_file(tmp_path / "new.jsonl", overwrite=False) == tmp_path / "new.jsonl"


# --------------------------------------------------------------------------- atomic_write / atomic_file


def test_atomic_write_replaces_and_creates_parents(tmp_path):
    p = tmp_path / "d" / "scores.json"
    assert fs.atomic_write(p, "one") == p
    fs.atomic_write(p, b"two")
    assert p.read_bytes() == b"two"
    assert leftovers(p.parent) == []
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "scores.json"
    p.write_text("old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        fs.atomic_write(p, "new and longer")
    assert p.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_atomic_file_error_in_the_block_keeps_the_old_file(tmp_path):
    p = tmp_path / "cache.npz"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with fs.atomic_file(p) as f:
            f.write(b"half")
            raise RuntimeError("interrupted")
    assert p.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "c"))
    assert fs.cache_root() == tmp_path / "c"
    monkeypatch.delenv("FINETUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert fs.cache_root() == tmp_path / "x" / "finetune"
