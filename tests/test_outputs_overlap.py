"""Outputs never land on inputs, and a run never trains into someone else's folder (docs/bad-input.md,
"Runs, outputs and resume"), through the CLI: exit code, one `error:` line, every file untouched.

- any out_dir (train, merge, combine, moe, eval) that is, contains or is inside an input (adapter,
  base model, dataset file, MoE config) is refused, with overwrite=true too;
- resume=auto / overwrite=true into a folder with files finetune did not write is refused, naming them;
- an out_dir that cannot be created is one line before any model loads;
- the cache root is absolute, and an unwritable one names FINETUNE_CACHE.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from test_bad_input import ALPACA, expect_error, train_args, write_jsonl
from finetune import fs


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base of our own (so it can be the target of a mistake) with two adapters on it."""
    from tiny_peft import random_lora_adapter
    from finetune.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("models")
    base = make_tiny_model(root / "base")
    return {"base": base, "a": random_lora_adapter(root / "a", base, r=4),
            "b": random_lora_adapter(root / "b", base, seed=1, r=4)}


@pytest.fixture
def work(tmp_path, models):
    """The user's folder: a copy of the base and adapters, and a dataset file."""
    for name in ("base", "a", "b"):
        shutil.copytree(models[name], tmp_path / name)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    for name in ("a", "b"):  # the adapters point at this folder's base
        f = tmp_path / name / "adapter_config.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "base_model_name_or_path": str(tmp_path / "base")}))
    assert cfg["r"] == 4
    write_jsonl(tmp_path / "data.jsonl", ALPACA * 4)
    return tmp_path


# --------------------------------------------------------------------------- outputs onto inputs


def test_combine_into_one_of_its_adapters_is_refused_even_with_overwrite(work, capsys):
    expect_error(["merge", f"adapters=[{work / 'a'},{work / 'b'}]", f"out_dir={work / 'a'}", "overwrite=true"], 2,
                 f"out_dir {work / 'a'} is the adapter {work / 'a'}", "overwrite=true does not change this",
                 capsys=capsys, root=work)


def test_combine_into_a_folder_inside_an_adapter_is_refused(work, capsys):
    expect_error(["merge", f"adapters=[{work / 'a'},{work / 'b'}]", f"out_dir={work / 'b' / 'sub'}"], 2,
                 "is inside the adapter", capsys=capsys, root=work)


def test_merge_into_the_base_model_dir_is_refused_even_with_overwrite(work, capsys):
    expect_error(["merge", f"adapter={work / 'a'}", f"out_dir={work / 'base'}", "overwrite=true"], 2,
                 f"out_dir {work / 'base'} is the base model", capsys=capsys, root=work)


def test_merge_into_a_folder_containing_the_adapter_is_refused(work, capsys):
    expect_error(["merge", f"adapter={work / 'a'}", f"out_dir={work}", "overwrite=true"], 2,
                 "contains the adapter", capsys=capsys, root=work)


def test_train_into_the_base_model_dir_is_refused(work, capsys):
    expect_error(train_args(work, f"model.name={work / 'base'}", f"out_dir={work / 'base'}", "overwrite=true"), 2,
                 "is the base model", capsys=capsys, root=work)


def test_train_into_a_folder_holding_the_dataset_file_is_refused(work, capsys):
    expect_error(train_args(work, f"data.path={work / 'data.jsonl'}", "data.format=alpaca", f"out_dir={work}",
                            "resume=auto"), 2, f"contains the dataset file {work / 'data.jsonl'}",
                 capsys=capsys, root=work)


def test_eval_into_an_adapter_is_refused(work, capsys):
    expect_error(["eval", "suite=tiny", f"models=[base,{work / 'a'}]", f"out_dir={work / 'a'}", "overwrite=true"],
                 2, "is the model", capsys=capsys, root=work)


def test_moe_into_an_expert_is_refused(work, capsys):
    cfg = work / "moe.yaml"
    cfg.write_text(f"base_model: {work / 'base'}\ngate_mode: random\nexperts:\n"
                   f"  - adapter: {work / 'a'}\n  - adapter: {work / 'b'}\n")
    expect_error(["moe", f"config={cfg}", f"out_dir={work / 'b'}", "overwrite=true"], 2, "is the expert",
                 capsys=capsys, root=work)


def test_check_apart_names_the_relation(tmp_path):
    (tmp_path / "in").mkdir()
    fs.check_apart(tmp_path / "out", [("adapter", tmp_path / "in"), ("model", "org/hub-id"), ("x", None)])
    for out, rel in ((tmp_path / "in", "is"), (tmp_path, "contains"), (tmp_path / "in" / "o", "is inside")):
        with pytest.raises(fs.UsageError, match=f"out_dir {out} {rel} the adapter"):
            fs.check_apart(out, [("adapter", tmp_path / "in")])


# --------------------------------------------------------------------------- someone else's folder


def test_resume_auto_into_a_folder_of_user_files_is_refused_naming_them(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("years of work")
    (tmp_path / "photos").mkdir()
    expect_error(train_args(tmp_path, f"out_dir={tmp_path}", "resume=auto"), 2,
                 "holds files finetune did not write: photos, thesis.tex", capsys=capsys, root=tmp_path)


def test_overwrite_does_not_replace_a_users_loss_png(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "loss.png").write_bytes(b"my own plot")
    expect_error(train_args(tmp_path, "overwrite=true", "output.plot=true"), 2,
                 "holds files finetune did not write: loss.png", capsys=capsys, root=tmp_path)


def test_a_runs_folder_with_a_stray_user_file_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "step-000002").mkdir()
    (out / "notes.txt").write_text("mine")
    expect_error(train_args(tmp_path, "resume=auto"), 2, "did not write: notes.txt;", capsys=capsys, root=tmp_path)


# --------------------------------------------------------------------------- out_dir and cache


def test_out_dir_that_cannot_be_created_is_one_line_before_model_load(tmp_path, capsys, monkeypatch):
    from finetune.training import loop

    monkeypatch.setattr(loop, "load_tokenizer", lambda *a: pytest.fail("loaded before checking out_dir"))
    (tmp_path / "file").write_text("x")
    expect_error(train_args(tmp_path, f"out_dir={tmp_path / 'file' / 'run'}"), 2,
                 f"out_dir {tmp_path / 'file' / 'run'} cannot be created: Not a directory", capsys=capsys,
                 root=tmp_path)


def test_relative_finetune_cache_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FINETUNE_CACHE", "rel/cache")
    assert fs.cache_root() == tmp_path / "rel" / "cache"
    monkeypatch.setenv("FINETUNE_CACHE", "~/c")
    assert fs.cache_root().is_absolute() and "~" not in str(fs.cache_root())


def test_unwritable_home_names_finetune_cache(tmp_path, capsys, monkeypatch):
    (tmp_path / "home").write_text("HOME is a file here, so nothing under it can be created")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FINETUNE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    err = expect_error(train_args(tmp_path, f"out_dir={tmp_path / 'out'}"), 2, "is not writable",
                       "set FINETUNE_CACHE to a writable directory", capsys=capsys, root=tmp_path)
    assert str(tmp_path / "home") in err


def test_relative_finetune_cache_gives_adapters_an_absolute_base_path(tmp_path, capsys, monkeypatch):
    from test_bad_input import run_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FINETUNE_CACHE", "cache")
    rc, _, err = run_cli(train_args(tmp_path, "output.plot=false"), capsys)
    assert rc == 0, err
    base = json.loads((tmp_path / "out" / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).is_absolute() and Path(base).is_relative_to(tmp_path / "cache"), base
