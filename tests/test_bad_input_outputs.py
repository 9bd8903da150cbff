"""docs/bad-input.md, "Outputs replaced whole, inputs checked" (rows O*, I*): nothing a user owns
is written over without overwrite=true, an input is never an output, a model folder is replaced
whole, and a corrupt input or a device as data is one line. Through the CLI, in this process.

The harness (expect_error, run_cli, the `work` folder) is tests/test_bad_input.py's.
"""

from __future__ import annotations

import json
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
