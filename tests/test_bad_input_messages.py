"""docs/bad-input.md, "The line a user needs" (rows W*): refusals that used to say the wrong
thing, and interruptions that say what stopped and what is left. Through the CLI, in this process.

The harness (expect_error, run_cli, train_args, the `work` folder) is tests/test_bad_input.py's.
"""

from __future__ import annotations

import logging

import pytest

from test_bad_input import ALPACA, _wide_console, expect_error, run_cli, train_args, work, write_jsonl  # noqa: F401


# --------------------------------------------------------------------------- W1: a folder where a file goes


@pytest.mark.parametrize("argv,says", [
    (["recipe={d}"], "recipe {d} is a folder; give its YAML file"),
    (["moe", "config={d}", "out_dir={o}"], "moe config {d} is a folder; give the MoE YAML file in it"),
    (["eval", "suite={d}", "out_dir={o}"], "eval suite {d} is a folder; give its YAML file"),
    (["data", "recipe=tiny-lora", "data.chat_template={d}"], "data.chat_template: {d} is a folder"),
])
def test_w1_a_folder_where_a_file_is_expected_is_not_not_found(work, capsys, argv, says):
    d = work / "folder"
    d.mkdir()
    fill = {"d": d, "o": work / "out"}
    expect_error([a.format(**fill) for a in argv], 2, says.format(**fill), capsys=capsys, root=work)


# --------------------------------------------------------------------------- W2, W3: chat templates


def test_w2_a_template_error_names_its_line(work, capsys):
    t = work / "t.jinja"
    t.write_text("{% if messages %}\n{{ messages[0].content }}\n{% endif %}\n{{ foo( }}\n")
    expect_error(["data", "recipe=tiny-lora", f"data.chat_template={t}"], 2,
                 f"data.chat_template {t} line 4: not a valid jinja template", capsys=capsys, root=work)


@pytest.mark.parametrize("template,says", [
    ("{% for m in messages %}{% endfor %}", "renders nothing: a user + assistant conversation comes out as empty"),
    ("{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}",
     "never writes the assistant's message"),
])
def test_w3_a_template_that_renders_no_answer_is_named_not_no_trained_tokens(work, capsys, template, says):
    t = work / "t.jinja"
    t.write_text(template)
    err = expect_error(["data", "recipe=tiny-lora", f"data.chat_template={t}", "data.cache=false"], 2, says,
                       capsys=capsys, root=work)
    assert "no trained tokens" not in err


# --------------------------------------------------------------------------- W4: resume with only corrupt checkpoints


def test_w4_resume_auto_with_every_checkpoint_corrupt_says_so(work, capsys):
    out = work / "out"
    rc, _, err = run_cli(train_args(work, "train.max_steps=2", "train.save_every=1"), capsys)
    assert rc == 0, err
    for name in ("step-000001", "final"):
        f = out / name / "adapter_model.safetensors"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    expect_error(train_args(work, "train.max_steps=2", "train.save_every=1", "resume=auto"), 2,
                 f"resume=auto: every checkpoint in {out} is corrupt (2; newest: {out / 'final'} is corrupt: "
                 "adapter_model.safetensors fails its sha256 checksum); nothing to resume from",
                 capsys=capsys, root=work)


# --------------------------------------------------------------------------- W5: eval into a file


def test_w5_eval_into_an_existing_file_is_refused_before_any_model_loads(work, capsys, monkeypatch):
    from finetune.eval import run as eval_run

    monkeypatch.setattr(eval_run, "_evaluate", lambda *a, **k: pytest.fail("evaluated before the refusal"))
    expect_error(["eval", "suite=tiny", "models=[base]", "base_model=tiny", f"out_dir={work / 'notes.txt'}"], 2,
                 f"out_dir {work / 'notes.txt'} exists and is not a directory", capsys=capsys, root=work)


# --------------------------------------------------------------------------- W6: interrupted, and what is left


def _interrupt(*a, **k):
    raise KeyboardInterrupt


def test_w6_interrupted_data_preparation(work, capsys, monkeypatch):
    from finetune.data import pipeline

    monkeypatch.setattr(pipeline, "_tokenize_all", _interrupt)
    f = write_jsonl(work / "data.jsonl", ALPACA)
    rc, _, err = run_cli(["data", "recipe=tiny-lora", f"data.path={f}", "data.format=alpaca"], capsys)
    assert rc == 130
    assert f"interrupted (Ctrl-C) while preparing the data ({f}): nothing was cached" in err


def test_w6_interrupted_merge(work, capsys, monkeypatch):
    import finetune.merge as merge
    from tiny_peft import random_lora_adapter
    from finetune.models.tiny import tiny_model_dir

    a = random_lora_adapter(work / "a", tiny_model_dir(), r=4)
    monkeypatch.setattr(merge, "load_full_precision", _interrupt)
    rc, _, err = run_cli(["merge", f"adapter={a}", f"out_dir={work / 'm'}"], capsys)
    assert rc == 130 and f"interrupted (Ctrl-C) while merging {a} into " in err
    assert f"nothing was written to {work / 'm'}; run the same command again" in err
    assert not (work / "m").exists()


def test_w6_interrupted_eval(work, capsys, monkeypatch):
    from finetune.eval import run as eval_run

    monkeypatch.setattr(eval_run, "score_task", _interrupt)
    out = work / "ev"
    rc, _, err = run_cli(["eval", "suite=tiny", "models=[base]", "base_model=tiny", f"out_dir={out}",
                          "progress=false"], capsys)
    assert rc == 130 and "interrupted (Ctrl-C) while evaluating base (1 of 1) on suite tiny" in err
    assert f"no scorecard was written to {out}" in err


# --------------------------------------------------------------------------- W7: int8 on CPU warns once


def test_w7_int8_cast_warning_once(caplog):
    from finetune.config import QuantConfig
    from finetune.models import load

    load.bnb_config(QuantConfig(mode="int8"), "cpu")
    bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.autograd._functions"):
        for _ in range(28):  # once per int8 layer and step
            bnb_log.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "bf16")
    load.bnb_config(QuantConfig(mode="int8"), "cpu")  # a second load adds no second filter
    assert sum("MatMul8bitLt" in r.getMessage() for r in caplog.records) <= 1
