"""docs/bad-input.md, "Outputs replaced whole, inputs checked" (rows O*, I*): nothing a user owns
is written over without overwrite=true, an input is never an output, a model folder is replaced
whole, and a corrupt input or a device as data is one line. Through the CLI, in this process.

The harness (expect_error, run_cli, the `work` folder) is tests/test_bad_input.py's.
"""

from __future__ import annotations

import os

import pytest

from test_bad_input import ALPACA, _wide_console, expect_error, run_cli, work, write_jsonl  # noqa: F401


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    from tiny_peft import random_lora_adapter
    from finetune.models.tiny import tiny_model_dir

    root = tmp_path_factory.mktemp("adapters")
    base = tiny_model_dir()
    return {"base": base, "a": random_lora_adapter(root / "a", base, r=4),
            "b": random_lora_adapter(root / "b", base, seed=1, r=4)}


def _data(work, *extra):
    f = write_jsonl(work / "data.jsonl", ALPACA)
    return ["data", "recipe=tiny-lora", "n=0", f"data.path={f}", "data.format=alpaca", "data.cache=false",
            "output.progress=false", *extra]


# --------------------------------------------------------------------------- O: dump= is an output


def test_o1_dump_onto_the_dataset_is_refused_even_with_overwrite(work, capsys):
    f = work / "data.jsonl"
    expect_error(_data(work, f"dump={f}", "overwrite=true"), 2, f"dump={f} is the dataset file {f}",
                 "overwrite=true does not change this", capsys=capsys, root=work)


def test_o2_dump_onto_an_existing_file_needs_overwrite(work, capsys):
    old = work / "notes.txt"
    expect_error(_data(work, f"dump={old}"), 2, f"dump={old} exists; pass overwrite=true", capsys=capsys, root=work)
    rc, out, err = run_cli(_data(work, f"dump={old}", "overwrite=true"), capsys)
    assert rc == 0, err
    assert len(old.read_text().splitlines()) >= 3  # replaced by the dump
    assert not [p for p in work.iterdir() if ".tmp-" in p.name]


def test_o3_dump_onto_the_recipe_or_into_the_base_model_is_refused(work, capsys, adapters):
    from finetune.resources import find_resource

    recipe = work / "mine.yaml"
    recipe.write_text(find_resource("recipes", "tiny-lora").read_text())
    args = _data(work, f"dump={recipe}", "overwrite=true")
    args[1] = f"recipe={recipe}"
    expect_error(args, 2, f"dump={recipe} is the recipe", capsys=capsys, root=work)
    expect_error(_data(work, f"model.name={adapters['base']}", f"dump={adapters['base']}/x.jsonl"), 2,
                 "is inside the base model", capsys=capsys, root=work)


@pytest.mark.parametrize("target", ["/dev/null", "fifo"])
def test_o4_dump_to_a_device_or_fifo_is_refused(work, capsys, target):
    if target == "fifo":
        os.mkfifo(work / "fifo")
        target = str(work / "fifo")
    expect_error(_data(work, f"dump={target}", "overwrite=true"), 2, "is not a regular file", capsys=capsys,
                 root=work)


# --------------------------------------------------------------------------- I: inputs checked


@pytest.mark.parametrize("target", ["/dev/null", "fifo"])
def test_i1_device_or_fifo_as_data_path(work, capsys, target):
    if target == "fifo":
        os.mkfifo(work / "fifo")
        target = str(work / "fifo")
    expect_error(["data", "recipe=tiny-lora", f"data.path={target}", "data.format=alpaca", "data.cache=false"], 2,
                 f"data path {target} is not a regular file or folder", capsys=capsys, root=work)


def _copy_adapter(src, dst, with_manifest: bool):
    import hashlib
    import shutil

    from finetune import manifest

    shutil.copytree(src, dst)
    if with_manifest:  # as a training checkpoint carries them
        doc = manifest.build_manifest(dst, step=2)
        (dst / manifest.MANIFEST).write_bytes(doc)
        (dst / manifest.MARKER).write_text(hashlib.sha256(doc).hexdigest() + "\n")
    return dst


def _flip_a_byte(f):
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))


def _truncate(f):
    f.write_bytes(f.read_bytes()[:-40])


@pytest.mark.parametrize("command", ["merge", "combine", "eval", "export", "moe"])
def test_i2_a_corrupt_checkpoint_is_refused_by_every_reader(work, capsys, adapters, command):
    bad = _copy_adapter(adapters["a"], work / "bad", with_manifest=True)
    _flip_a_byte(bad / "adapter_model.safetensors")
    _refuse_bad_input(work, capsys, adapters, command, bad, "adapter_model.safetensors fails its sha256 checksum")


@pytest.mark.parametrize("command", ["merge", "eval", "export"])
def test_i3_a_truncated_weights_file_is_one_line_naming_it(work, capsys, adapters, command):
    bad = _copy_adapter(adapters["a"], work / "bad", with_manifest=False)
    _truncate(bad / "adapter_model.safetensors")
    _refuse_bad_input(work, capsys, adapters, command, bad,
                      f"{bad / 'adapter_model.safetensors'} is not a readable safetensors file")


def _refuse_bad_input(work, capsys, adapters, command, bad, says):
    out = f"out_dir={work / 'out'}"
    argv = {"merge": ["merge", f"adapter={bad}", out],
            "combine": ["merge", f"adapters=[{adapters['a']},{bad}]", out],
            "eval": ["eval", "suite=tiny", f"models=[base,{bad}]", out, "progress=false"],
            "export": ["export", f"adapter={bad}", out]}.get(command)
    if command == "moe":
        cfg = work / "moe.yaml"
        cfg.write_text(f"base_model: {adapters['base']}\ngate_mode: random\nexperts:\n  - adapter: {bad}\n"
                       f"  - adapter: {adapters['b']}\n")
        argv = ["moe", f"config={cfg}", out]
    expect_error(argv, 2, says, capsys=capsys, root=work)


def test_i4_disk_full_while_writing_a_merge(work, capsys, adapters, monkeypatch):
    import finetune.merge as merge

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(merge, "portable_config", full)
    expect_error(["merge", f"adapter={adapters['a']}", f"out_dir={work / 'merged'}"], 1,
                 f"could not write {work / 'merged'}: disk full (No space left on device); nothing was written there",
                 capsys=capsys, root=work)
    assert not (work / "merged").exists() and not [p for p in work.iterdir() if ".tmp-" in p.name]


def test_i5_disk_full_while_writing_the_model_cache(work, capsys, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setenv("FINETUNE_CACHE", str(work / "cache"))
    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", full)
    expect_error(_data(work), 1, "could not write", "tiny-llama-v1: disk full", "set FINETUNE_CACHE",
                 capsys=capsys, root=work)


# --------------------------------------------------------------------------- O5: one writer per output folder


@pytest.mark.parametrize("command", ["merge", "combine", "eval", "moe"])
def test_o5_outputs_take_the_training_lock(work, capsys, adapters, command):
    import subprocess
    import sys

    out = work / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from finetune.fs import out_dir_lock\n"
         "with out_dir_lock(sys.argv[1]):\n print('locked', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = {"merge": ["merge", f"adapter={adapters['a']}"],
                "combine": ["merge", f"adapters=[{adapters['a']},{adapters['b']}]"],
                "eval": ["eval", "suite=tiny", f"models=[base,{adapters['a']}]", "progress=false"]}.get(command)
        if command == "moe":
            cfg = work / "moe.yaml"
            cfg.write_text(f"base_model: {adapters['base']}\ngate_mode: random\nexperts:\n  - source_model: "
                           f"{adapters['base']}\n  - source_model: {adapters['base']}\n")
            argv = ["moe", f"config={cfg}"]
        before = sorted(p.name for p in out.iterdir())
        rc, _, err = run_cli([*argv, f"out_dir={out}"], capsys)
        assert rc == 2 and f"out_dir {out} is in use by another run (pid {holder.pid}" in err, err
        assert sorted(p.name for p in out.iterdir()) == before
    finally:
        holder.kill()
        holder.wait()
