"""docs/bad-input.md, "Settings that contradict each other, the model or the data" (rows K*):
each refused before any work with one line naming both sides. Through the CLI, in this process.

The harness (expect_error, run_cli, train_args, the `work` folder) is tests/test_bad_input.py's.
"""

from __future__ import annotations

import pytest

from test_bad_input import ALPACA, _wide_console, expect_error, run_cli, train_args, work, write_jsonl  # noqa: F401
from finetune.data import pipeline


@pytest.fixture
def no_data_prep(monkeypatch):
    """A refusal 'before work' must come before the data is prepared."""
    monkeypatch.setattr(pipeline, "prepare", lambda *a, **k: pytest.fail("data prepared before the refusal"))


def test_k1_warmup_longer_than_the_run(work, capsys, no_data_prep):
    expect_error(train_args(work, "train.max_steps=3", "train.warmup_steps=5"), 2,
                 "train.warmup_steps=5 is longer than the run, train.max_steps=3", "never reach train.lr=0.003",
                 capsys=capsys, root=work)


def test_k2_validation_data_that_is_the_training_data(work, capsys, no_data_prep):
    f = write_jsonl(work / "data.jsonl", ALPACA)
    expect_error(train_args(work, f"data.path={f}", "data.format=alpaca", f"data.val_path={f}"), 2,
                 f"data.val_path={f} is the training data ({f})", "data.val_fraction", capsys=capsys, root=work)


def test_k3_lora_rank_larger_than_the_layers_it_adapts(work, capsys, no_data_prep):
    # the tiny model's k_proj/v_proj map 64 -> 32 (2 kv heads of 16)
    expect_error(train_args(work, "lora.r=48"), 2, "lora.r=48 is larger than k_proj of tiny (64 -> 32, rank at most 32)",
                 "use lora.r<=32", capsys=capsys, root=work)


def test_k3b_lora_rank_within_the_targeted_layers_is_allowed():
    from transformers import AutoConfig

    from finetune.config import load_config
    from finetune.models.tiny import tiny_model_dir
    from finetune.training import preflight

    cfg = load_config("tiny-lora", {"lora.r": "48", "lora.target_modules": "[q_proj,o_proj]"})
    preflight.check_lora_rank(cfg, AutoConfig.from_pretrained(tiny_model_dir()))  # 64 x 64: fine


def test_k4_weights_that_cancel(work, capsys):
    import shutil

    from tiny_peft import random_lora_adapter
    from finetune.models.tiny import tiny_model_dir

    a = random_lora_adapter(work / "a", tiny_model_dir(), r=4)
    shutil.copytree(a, work / "a-copy")  # the same weights under another name
    expect_error(["merge", f"adapters=[{a},{work / 'a-copy'}]", "weights=[1,-1]", f"out_dir={work / 'out'}"], 2,
                 f"weights cancel: {a} (1) + {work / 'a-copy'} (-1) add up to 0", "would change nothing",
                 capsys=capsys, root=work)


def test_k5_plan_beyond_the_models_context(work, capsys):
    expect_error(["plan", "recipe=tiny-lora", "data.seq_len=4096"], 2,
                 "data.seq_len=4096 is past the context of tiny (2048 tokens)", capsys=capsys, root=work)


def test_k5b_plan_never_offers_a_length_past_the_context(capsys):
    import json

    rc, out, err = run_cli(["plan", "recipe=tiny-lora", "format=json", "gpu_memory=80GiB"], capsys)
    assert rc == 0, err
    assert json.loads(out)["max_seq_len"] <= 2048


@pytest.mark.parametrize("key", ["subset", "revision"])
def test_k6_a_hub_setting_on_a_local_file(work, capsys, no_data_prep, key):
    f = write_jsonl(work / "data.jsonl", ALPACA)
    expect_error(train_args(work, f"data.path={f}", "data.format=alpaca", f"data.{key}=main"), 2,
                 f"data.{key}=main applies to hub datasets, but {f} is local", f"drop data.{key}",
                 capsys=capsys, root=work)


def test_k7_resume_on_changed_data_is_refused_unless_told(work, capsys):
    f = write_jsonl(work / "data.jsonl", ALPACA * 4)
    run = ["recipe=tiny-lora", f"out_dir={work / 'out'}", f"data.path={f}", "data.format=alpaca", "data.cache=false",
           "output.progress=false", "train.save_every=1", "data.val_fraction=0"]
    rc, _, err = run_cli([*run, "train.max_steps=2"], capsys)
    assert rc == 0, err
    write_jsonl(f, ALPACA[::-1] * 4)  # the same rows, another file: another fingerprint
    expect_error([*run, "train.max_steps=3", "resume=auto"], 2,
                 f"resume from {work / 'out' / 'final'}: the training data changed since it was saved ({f}: fingerprint",
                 "pass resume_changed_data=true", capsys=capsys, root=work)
    rc, out, err = run_cli([*run, "train.max_steps=3", "resume=auto", "resume_changed_data=true"], capsys)
    assert rc == 0 and "the training data changed since" in out and "continuing on the new data" in out, err
