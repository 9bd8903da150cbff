"""The CLI as a user meets it: one line on error, exit 2 for usage, nothing on disk touched."""

import subprocess
import sys

import pytest


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "finetune.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_help_lists_commands_and_keys():
    r = cli("--help")
    assert r.returncode == 0
    for word in ["recipes", "data", "eval", "merge", "moe", "plan", "train.max_steps", "--print_config"]:
        assert word in r.stdout


def test_recipes_lists_every_recipe():
    r = cli("recipes")
    assert r.returncode == 0
    assert "qlora-7b-alpaca" in r.stdout and "tiny-lora" in r.stdout


def test_print_config_resolves_overrides():
    r = cli("recipe=qlora-7b-alpaca", "train.max_steps=3", "--print_config")
    assert r.returncode == 0, r.stderr
    assert "max_steps: 3" in r.stdout and "mode: nf4" in r.stdout


def test_typo_suggests_key_exit_2_one_line():
    r = cli("recipe=qlora-7b-alpaca", "trian.max_steps=3", "--print_config")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "train.max_steps" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args,expect", [
    (["recipe=nope-recipe"], "unknown recipe"),
    (["recipe=tiny-lora", "train.max_steps=abc"], "expected int"),
    (["recipe=tiny-lora", "max_steps"], "expected key=value"),
    (["evl"], "did you mean eval"),
    (["recipe=tiny-lora", "--print_confg"], "did you mean --print_config"),
])
def test_usage_errors(args, expect):
    r = cli(*args)
    assert r.returncode == 2, r.stderr
    assert expect in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0
