"""Bad settings of a training run (docs/bad-input.md, "Training settings"): each refused with one
line and exit 2 before data preparation, model loading or anything written, through the CLI.

The harness (expect_error, train_args, the `work` folder) is tests/test_bad_input.py's.
"""

from __future__ import annotations

import pytest

from test_bad_input import _wide_console, expect_error, run_cli, train_args, work  # noqa: F401 (fixtures)

# (key=value, what the one error line says): one row each in docs/bad-input.md
RANGES = [
    ("train.max_grad_norm=-1", "train.max_grad_norm must be >= 0, got -1.0"),
    ("lora.alpha=0", "lora.alpha must be > 0, got 0"),
    ("lora.dropout=1.5", "lora.dropout must be in [0, 1), got 1.5"),
    ("train.warmup_steps=-3", "train.warmup_steps must be >= 0, got -3"),
    ("train.min_lr_ratio=2", "train.min_lr_ratio must be in [0, 1], got 2.0"),
    ("train.save_every=-1", "train.save_every must be >= 0, got -1"),
    ("train.keep_last=0", "train.keep_last must be >= 1, got 0"),
    ("train.keep_last=-1", "train.keep_last must be >= 1, got -1"),
    ("train.eval_every=-1", "train.eval_every must be >= 0, got -1"),
    ("train.eval_batches=-1", "train.eval_batches must be >= 0, got -1"),
    ("train.global_batch_size=10000000", "train.global_batch_size must be in [1, 65536], got 10000000"),
    ("train.micro_batch_size=0", "train.micro_batch_size must be >= 1, got 0"),
    ("train.seed=-1", "train.seed must be in [0, 4294967295], got -1"),
    ("train.lr=0", "train.lr must be in (0, 1], got 0.0"),
    ("train.lr=.inf", "train.lr must be a finite number, got inf"),
    ("train.lr=1e400", "train.lr must be a finite number, got inf"),
    ("train.lr=nan", "train.lr: expected a finite number, got 'nan'"),
    ("train.weight_decay=-1", "train.weight_decay must be >= 0, got -1.0"),
    ("train.log_every=0", "train.log_every must be >= 1, got 0"),
    ("train.loss_chunk_size=-1", "train.loss_chunk_size must be >= 0, got -1"),
    ("train.router_aux_loss_coef=-1", "train.router_aux_loss_coef must be >= 0, got -1.0"),
    ("data.max_rows=0", "data.max_rows must be >= 1, got 0 (null = every row)"),
    ("data.num_proc=0", "data.num_proc must be >= 1, got 0"),
    ("data.val_fraction=1", "data.val_fraction must be in [0, 1), got 1.0"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens must be >= 1, got 0"),
    ("devices=0", "devices must be >= 1, got 0"),
    ("num_nodes=0", "num_nodes must be >= 1, got 0"),
    ("train.seed=abc", "train.seed: expected an integer, got 'abc'"),
    ("train.micro_batch_size=big", "train.micro_batch_size: expected an integer or 'auto', got 'big'"),
    ("lora.target_modules=3", "lora.target_modules: expected a list like [a,b], got '3'"),
    ("model=3", "model: expected a mapping like {key: value} or a YAML file, got '3'"),
    ("lora.target_modules+=", "lora.target_modules has an empty module name"),
    ("data.roles={bot: wizard}", "data.roles maps to a role that does not exist (bot: wizard)"),
    ("resume=", "resume: expected no, auto or a checkpoint directory, got ''"),
    ("out_dir=", "out_dir is empty"),
]


@pytest.mark.parametrize("setting,says", RANGES, ids=[r[0] for r in RANGES])
def test_setting_out_of_range(work, capsys, setting, says):
    key = setting.split("=", 1)[0] + "="
    args = [a for a in train_args(work) if not a.startswith(key)]  # a key given twice is refused
    expect_error([*args, setting], 2, says, capsys=capsys, root=work)


def test_key_given_twice(work, capsys):
    expect_error(train_args(work, "lora.target_modules+=o_proj", "lora.target_modules+=q_proj"), 2,
                 "lora.target_modules+= is given twice", "lora.target_modules+=[a,b]", capsys=capsys, root=work)


@pytest.mark.parametrize("word,means", [("no", "'no'"), ("false", "'no'"), ("yes", "auto"), ("true", "auto")])
def test_resume_words_parse(work, capsys, word, means):
    rc, out, err = run_cli([f"recipe=tiny-lora", f"resume={word}", "--print_config"], capsys)
    assert rc == 0, err
    assert f"resume: {means}" in out


def test_resume_no_in_a_recipe_file(work, capsys):
    f = work / "mine.yaml"
    f.write_text("resume: no\ntrain:\n  max_steps: 1\n")  # YAML 1.1 reads `no` as false
    rc, out, err = run_cli([f"recipe={f}", "--print_config"], capsys)
    assert rc == 0 and "resume: 'no'" in out, err


def test_nan_in_a_recipe_file(work, capsys):
    f = work / "mine.yaml"
    f.write_text("train:\n  lr: .nan\n")
    expect_error([f"recipe={f}"], 2, "train.lr must be a finite number, got nan", capsys=capsys, root=work)


# --------------------------------------------------------------------------- checked against the machine and the model


def test_seq_len_past_the_model_context(work, capsys):
    expect_error(train_args(work, "data.seq_len=4096"), 2, "data.seq_len=4096 is past the context of tiny",
                 "2048 tokens", capsys=capsys, root=work)


def test_num_nodes_without_a_launcher(work, capsys, monkeypatch):
    for var in ("SLURM_NTASKS", "SLURM_JOB_NAME", "TORCHELASTIC_RUN_ID", "NODE_RANK", "MASTER_ADDR", "LSB_JOBID",
                "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(var, raising=False)
    expect_error(train_args(work, "num_nodes=2"), 2, "num_nodes=2 but no launcher", "torchrun --nnodes=2",
                 "srun", capsys=capsys, root=work)


def test_logger_not_installed(work, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name, *a))
    expect_error(train_args(work, "output.loggers=[csv,tensorboard]"), 2, "output.loggers has tensorboard",
                 "pip install -e '", "[tensorboard]'", capsys=capsys, root=work)


def test_unknown_eval_suite_before_training(work, capsys):
    expect_error(train_args(work, "eval.suite=nosuch"), 2, "unknown eval suite 'nosuch'", capsys=capsys, root=work)


def test_accelerator_not_here(work, capsys):
    import torch

    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    expect_error(train_args(work, "accelerator=mps"), 2, "accelerator=mps but MPS is not available",
                 capsys=capsys, root=work)


def test_revision_of_a_local_model(work, capsys):
    expect_error(train_args(work, "model.revision=v2"), 2, "model.revision=v2 applies to hub ids",
                 capsys=capsys, root=work)
