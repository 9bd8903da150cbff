"""The CLI as a user meets it: one line on error, exit 2 for usage, nothing on disk touched."""

import ast
import inspect
import subprocess
import sys
import typing

import pytest

from finetune import config
from finetune.cli import run as cli_run
from finetune.config import Config
from finetune.errors import UsageError
from finetune.typed import field_paths, split_overrides, to_argv


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_key_value_translates_to_jsonargparse_syntax():
    pairs = split_overrides(["train.lr=1e-4", "--lora.target_modules=[q_proj,v_proj]", "description=a=b", "x="])
    assert pairs == {"train.lr": "1e-4", "lora.target_modules": "[q_proj,v_proj]", "description": "a=b", "x": ""}
    assert to_argv(pairs) == ["--train.lr=1e-4", "--lora.target_modules=[q_proj,v_proj]", "--description=a=b", "--x="]
    # The Python API may pass plain values: they go as JSON, which jsonargparse reads as YAML.
    assert to_argv({"train.max_steps": 4, "overwrite": True, "precision": None, "lora.target_modules": ["q_proj"]}) == [
        "--train.max_steps=4", "--overwrite=true", "--precision=null", '--lora.target_modules=["q_proj"]']
    with pytest.raises(UsageError, match="expected key=value, got 'max_steps'"):
        split_overrides(["max_steps"])


def test_help_lists_commands_and_every_key_with_its_doc():
    r = cli("--help")
    assert r.returncode == 0, r.stderr
    for word in ["recipes", "data", "eval", "merge", "moe", "plan", "--print_config", "--debug", "key=value"]:
        assert word in r.stdout
    text = "".join(r.stdout.split())  # the help wraps docs across lines, also at hyphens
    docs = field_docs()
    assert set(docs) == set(field_paths(Config)) and len(docs) > 50
    for key, doc in docs.items():
        assert f"--{key}" in r.stdout and "".join(doc.split()) in text, key


def field_docs() -> dict[str, str]:
    """Dotted config key -> the docstring under its field in finetune/config.py."""
    docs = {}
    for cls in ast.walk(ast.parse(inspect.getsource(config))):
        if isinstance(cls, ast.ClassDef):
            for node, doc in zip(cls.body, cls.body[1:]):
                if isinstance(node, ast.AnnAssign) and isinstance(doc, ast.Expr):
                    docs[cls.name, node.target.id] = inspect.cleandoc(doc.value.value)
    sections = typing.get_type_hints(Config)
    out = {}
    for key in field_paths(Config):
        section, _, name = key.rpartition(".")
        out[key] = docs[sections[section].__name__ if section else "Config", name]
    return out


def test_command_help_is_jsonargparse_with_the_commands_keys(capsys):
    assert cli_run(["plan", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: finetune plan [key=value ...]" in out and "--gpu_memory GPU_MEMORY" in out
    assert "{table,json}" in out and "Any training config key" in out


def test_python_m_finetune_recipes_lists_every_recipe():
    r = cli("recipes")
    assert r.returncode == 0
    assert "qlora-7b-alpaca" in r.stdout and "tiny-lora" in r.stdout


def test_output_cut_short_by_the_reader_is_not_an_error():
    # `finetune recipes | head -0`: the reader is gone before anything is written
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "recipes"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    assert proc.wait(timeout=300) == 0
    assert proc.stderr.read() == b""


def test_print_config_resolves_overrides():
    r = cli("recipe=qlora-7b-alpaca", "train.max_steps=3", "lora.target_modules=[q_proj,v_proj]", "--print_config")
    assert r.returncode == 0, r.stderr
    assert "max_steps: 3" in r.stdout and "mode: nf4" in r.stdout and "- v_proj" in r.stdout


def test_typo_suggests_key_exit_2_one_line():
    r = cli("recipe=qlora-7b-alpaca", "trian.max_steps=3", "--print_config")
    assert r.returncode == 2
    assert r.stderr.strip() == ("error: command line: unknown key 'trian.max_steps' "
                                "(did you mean train.max_steps, train.warmup_steps, train.seed?)")


def test_import_cli_does_not_import_torch():
    r = subprocess.run([sys.executable, "-c", "import sys, finetune.cli; assert 'torch' not in sys.modules"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args,expect", [
    (["recipe=nope-recipe"], "unknown recipe"),
    (["recipe=tiny-lora", "train.max_steps=abc"],
     "command line: train.max_steps: expected an integer, got 'abc'"),
    (["recipe=tiny-lora", "quant.mode=nf3"], "command line: quant.mode must be one of none, nf4, int8, got 'nf3'"),
    (["recipe=tiny-lora", "output.loggers=[csv,wandbb]"],
     "output.loggers must be one of csv, tensorboard, wandb, mlflow, got 'wandbb'"),
    (["recipe=tiny-lora", "max_steps"], "expected key=value"),
    (["evl"], "did you mean eval"),
    (["recipe=tiny-lora", "--print_confg"], "did you mean --print_config"),
    (["merge", "method=tiez"], "method must be one of linear, cat, svd, ties,"),
    (["plan", "format=yaml"], "format must be one of table, json, got 'yaml'"),
    (["plan", "recipe=tiny-lora", "strategy=deepspeed"], "strategy must be one of auto, ddp, fsdp"),
])
def test_usage_errors(args, expect):
    r = cli(*args)
    assert r.returncode == 2, r.stderr
    assert expect in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")
