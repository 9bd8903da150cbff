"""The bad-input matrix (docs/bad-input.md), one test per row, through the CLI entry point.

Every refused input must give ONE `error:` line on stderr naming what is wrong and where, exit 2
for usage errors and 1 for runtime failures, no traceback (without --debug), and leave every file
that existed before exactly as it was. Rows that are not errors (extra fields, over-long samples,
broken lines without data.strict) check that the data is counted, not silently lost.

The CLI runs in this process (`finetune.cli.main`) to keep the matrix fast; the acceptance rows
also run as real processes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest

from finetune.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]

ALPACA = [{"instruction": f"Say {w}.", "input": "", "output": f"{w}!"} for w in ("hi", "yes", "no", "ok")]


# --------------------------------------------------------------------------- harness


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file under root -> (size, mtime, sha256): what 'nothing was touched' compares."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            out[p.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def _log_handlers_to_current_stderr() -> None:
    """Libraries (lightning, transformers) add StreamHandlers bound to the sys.stderr of the moment
    they are imported; in one pytest process that is an earlier (closed) capture. Point them at
    the current one, as a fresh process would have them."""
    import logging

    loggers = [logging.getLogger()] + [l for l in logging.Logger.manager.loggerDict.values()
                                       if isinstance(l, logging.Logger)]
    for logger in loggers:
        for h in logger.handlers:
            if (type(h) is logging.StreamHandler or type(h).__name__ == "_StderrHandler") \
                    and h.stream not in (sys.stdout, sys.stderr):
                h.stream = sys.stderr  # not setStream: that flushes the closed one


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    _log_handlers_to_current_stderr()
    with pytest.raises(SystemExit) as exc:
        cli_main([str(a) for a in args])
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


def expect_error(args, code: int, *needles: str, capsys, root: Path) -> str:
    """Run the CLI, check the one-line error, the exit code and that nothing under root changed."""
    before = snapshot(root)
    rc, out, err = run_cli(args, capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error:")]
    assert rc == code, f"exit {rc}, expected {code}\n{err}"
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    after = snapshot(root)
    assert {k: v for k, v in after.items() if k in before} == before, "a pre-existing file changed"
    assert sorted(after) == sorted(before), f"a failed command left files: {sorted(set(after) - set(before))}"
    return errors[0]


@pytest.fixture
def work(tmp_path):
    """A folder with the user's files; out_dir is a fresh path inside it."""
    (tmp_path / "notes.txt").write_text("user file that must survive\n")
    return tmp_path


def train_args(work: Path, *extra: str) -> list[str]:
    """A quick tiny-lora run into work/out; `extra` keys replace these defaults (a key given twice is refused)."""
    given = {e.split("=", 1)[0] for e in extra}
    base = ["recipe=tiny-lora", f"out_dir={work / 'out'}", "data.cache=false", "output.progress=false",
            "train.max_steps=1", "train.warmup_steps=0"]
    return [a for a in base if a.split("=", 1)[0] not in given] + list(extra)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def data_args(work: Path, rows: list, fmt: str = "alpaca", strict: bool = True, name: str = "data.jsonl",
              *extra: str) -> list[str]:
    f = write_jsonl(work / name, rows)
    return train_args(work, f"data.path={f}", f"data.format={fmt}", f"data.strict={str(strict).lower()}", *extra)


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # rich would wrap the long tmp paths in the stats table


def preview(work: Path, rows: list, capsys, fmt: str = "alpaca", *extra: str) -> str:
    """`finetune data` (no training): the statistics table the user sees, as text."""
    f = write_jsonl(work / "data.jsonl", rows)
    rc, out, err = run_cli(["data", "recipe=tiny-lora", "n=0", f"data.path={f}", f"data.format={fmt}",
                            "data.cache=false", "output.progress=false", *extra], capsys)
    assert rc == 0, err
    return out


def sharegpt(*turns) -> dict:
    return {"conversations": [{"from": f, "value": v} for f, v in turns]}


# --------------------------------------------------------------------------- data files


def test_malformed_json_file(work, capsys):
    f = work / "data.json"
    f.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]\n')
    expect_error(train_args(work, f"data.path={f}", "data.format=alpaca"), 2,
                 "data.json line 3 col", "invalid JSON", capsys=capsys, root=work)


def test_broken_jsonl_line_strict_names_line(work, capsys):
    args = data_args(work, [ALPACA[0], '{"instruction": "x", "output": ', ALPACA[1]])
    expect_error(args, 2, "data.jsonl line 2", "invalid JSON", capsys=capsys, root=work)


def test_broken_jsonl_line_lenient_is_dropped_and_counted(work, capsys):
    out = preview(work, [*ALPACA, '{"instruction": "x", "output": '], capsys)
    assert "invalid JSON line" in out and "data.jsonl line 5" in out


def test_missing_field(work, capsys):
    args = data_args(work, [ALPACA[0], {"instruction": "no answer"}])
    expect_error(args, 2, "line 2", "field 'output'", "missing field", capsys=capsys, root=work)


def test_extra_fields_are_ignored(work, capsys):
    out = preview(work, [{**r, "id": i, "source": "web", "meta": {"x": 1}} for i, r in enumerate(ALPACA)], capsys)
    assert "rows dropped" in out and "missing field" not in out and "wrong type" not in out
    assert "train examples" in out


def test_wrong_type(work, capsys):
    args = data_args(work, [ALPACA[0], {"instruction": "n", "output": 42}])
    expect_error(args, 2, "line 2", "field 'output'", "expected a string, got int",
                 capsys=capsys, root=work)


def test_unknown_role(work, capsys):
    rows = [sharegpt(("human", "hi"), ("gpt", "hello")), sharegpt(("human", "hi"), ("robot", "beep"))]
    args = data_args(work, rows, fmt="sharegpt")
    expect_error(args, 2, "line 2", "unknown role", "'robot'", capsys=capsys, root=work)


def test_empty_conversation(work, capsys):
    args = data_args(work, [sharegpt(("human", "hi"), ("gpt", "hello")), {"conversations": []}], fmt="sharegpt")
    expect_error(args, 2, "line 2", "empty conversation", capsys=capsys, root=work)


def test_no_assistant_turn(work, capsys):
    args = data_args(work, [sharegpt(("human", "hi"), ("gpt", "hello")), sharegpt(("human", "anyone?"))],
                     fmt="sharegpt")
    expect_error(args, 2, "line 2", "no assistant turn", capsys=capsys, root=work)


def test_every_row_bad_without_strict(work, capsys):
    args = data_args(work, [{"instruction": "a"}, {"instruction": "b"}, {"output": "c"}], strict=False)
    expect_error(args, 2, "data.jsonl", "no usable rows", "missing field: 3", capsys=capsys, root=work)


def test_sample_longer_than_seq_len_is_truncated_and_counted(work, capsys):
    long = {"instruction": "Repeat.", "input": "", "output": "word " * 60}
    out = preview(work, [*ALPACA, long], capsys, "alpaca", "data.seq_len=64", "data.val_fraction=0")
    assert "truncated" in out and "1 (seq_len 64)" in out


def test_sample_longer_than_seq_len_dropped_with_strict(work, capsys):
    long = {"instruction": "Repeat.", "input": "", "output": "word " * 60}
    args = data_args(work, [*ALPACA, long], "alpaca", True, "data.jsonl", "data.seq_len=64",
                     "data.truncation=drop", "data.val_fraction=0")
    expect_error(args, 2, "line 5", "too long", "seq_len 64", capsys=capsys, root=work)


def test_sample_whose_labels_are_all_masked(work, capsys):
    # The prompt alone fills seq_len: after truncation no answer token is left to train on.
    masked = {"instruction": "Read this. " + "blah " * 40, "input": "", "output": "ok"}
    args = data_args(work, [*ALPACA, masked], "alpaca", True, "data.jsonl", "data.seq_len=32",
                     "data.val_fraction=0")
    expect_error(args, 2, "line 5", "no trained tokens", capsys=capsys, root=work)
    out = preview(work, [*ALPACA, masked], capsys, "alpaca", "data.seq_len=32", "data.val_fraction=0")
    assert "no trained tokens after truncation" in out


def test_empty_dataset(work, capsys):
    f = work / "empty.jsonl"
    f.write_text("")
    expect_error(train_args(work, f"data.path={f}", "data.format=alpaca"), 2, "empty.jsonl", "empty",
                 capsys=capsys, root=work)


def test_nonexistent_dataset_path(work, capsys):
    expect_error(train_args(work, f"data.path={work / 'nope.jsonl'}", "data.format=alpaca"), 2,
                 "data path not found", "nope.jsonl", capsys=capsys, root=work)


def test_unreadable_data_file(work, capsys, monkeypatch):
    f = write_jsonl(work / "locked.jsonl", ALPACA)
    f.chmod(0)
    try:
        if _readable(f):  # running as root, which reads anything: simulate the OS refusing
            real = Path.read_text

            def read_text(self, *a, **k):
                if self.name == "locked.jsonl":
                    raise PermissionError(13, "Permission denied", str(self))
                return real(self, *a, **k)

            monkeypatch.setattr(Path, "read_text", read_text)
        expect_error(train_args(work, f"data.path={f}", "data.format=alpaca"), 2, "locked.jsonl",
                     "permission denied", capsys=capsys, root=work)
    finally:
        f.chmod(0o644)


def _readable(f: Path) -> bool:
    try:
        f.read_bytes()
        return True
    except PermissionError:
        return False


@pytest.fixture
def no_template_model(tmp_path_factory):
    from finetune.models.tiny import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("m") / "tiny-no-template")
    for f in path.glob("chat_template.*"):
        f.unlink()
    cfg = path / "tokenizer_config.json"
    data = json.loads(cfg.read_text())
    data.pop("chat_template", None)
    cfg.write_text(json.dumps(data))
    return path


def test_no_chat_template_and_unknown_prompt_style(work, capsys, no_template_model):
    args = data_args(work, ALPACA, "alpaca", True, "data.jsonl", f"model.name={no_template_model}",
                     "data.prompt_style=nonexistent-style")
    expect_error(args, 2, "data.prompt_style", "nonexistent-style", capsys=capsys, root=work)


def test_no_chat_template_but_template_required(work, capsys, no_template_model):
    args = data_args(work, ALPACA, "alpaca", True, "data.jsonl", f"model.name={no_template_model}",
                     "data.prompt_style=template")
    expect_error(args, 2, "no chat template", capsys=capsys, root=work)


# --------------------------------------------------------------------------- recipe and keys


def test_unknown_recipe(work, capsys):
    expect_error(["recipe=tiny-lroa", f"out_dir={work / 'out'}"], 2, "unknown recipe 'tiny-lroa'",
                 "did you mean tiny-lora", capsys=capsys, root=work)


def test_typo_key_did_you_mean(work, capsys):
    expect_error(train_args(work, "train.max_stpes=3"), 2, "train.max_stpes", "did you mean train.max_steps",
                 capsys=capsys, root=work)


def test_wrong_value_type(work, capsys):
    expect_error(train_args(work, "train.lr=fast"), 2, "command line: train.lr: expected a finite number",
                 "got 'fast'", capsys=capsys, root=work)


def test_value_not_among_choices(work, capsys):
    expect_error(train_args(work, "quant.mode=nf3"), 2, "command line: quant.mode must be one of none, nf4, int8, "
                 "got 'nf3'", capsys=capsys, root=work)


def test_value_out_of_range(work, capsys):
    args = [a for a in train_args(work) if not a.startswith("train.max_steps=")]  # a key given twice is refused
    expect_error([*args, "train.max_steps=0"], 2, "train.max_steps must be >= 1", capsys=capsys, root=work)


def test_recipe_yaml_not_a_mapping(work, capsys):
    f = work / "list.yaml"
    f.write_text("- model\n- data\n")
    expect_error([f"recipe={f}"], 2, "list.yaml", "must be a YAML mapping", capsys=capsys, root=work)


def test_recipe_yaml_invalid_syntax(work, capsys):
    f = work / "broken.yaml"
    f.write_text("train:\n  max_steps: 3\n  lr: [1e-4\n")
    expect_error([f"recipe={f}"], 2, "broken.yaml", "not valid YAML", capsys=capsys, root=work)


def test_recipe_unknown_key_names_file(work, capsys):
    f = work / "mine.yaml"
    f.write_text("model:\n  name: tiny\ntrain:\n  max_step: 3\n")
    expect_error([f"recipe={f}"], 2, "mine.yaml", "train.max_step", "did you mean train.max_steps",
                 capsys=capsys, root=work)


def test_recipe_bad_value_names_file(work, capsys):
    f = work / "mine.yaml"
    f.write_text("model:\n  attn_implementation: flash\ntrain:\n  max_steps: 3\n")
    expect_error([f"recipe={f}"], 2, f"recipe {f}: model.attn_implementation must be one of auto, sdpa, eager, "
                 "flash_attention_2, flex_attention, got 'flash'", capsys=capsys, root=work)


# --------------------------------------------------------------------------- model, LoRA, quantization


def test_nonexistent_model_path(work, capsys):
    expect_error(train_args(work, f"model.name={work / 'no-model'}"), 2, "model path not found", "no-model",
                 capsys=capsys, root=work)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """LoRA adapters without training: r=8 and r=4 on the tiny base, r=4 on a differently shaped base."""
    from tiny_peft import random_lora_adapter
    from finetune.models.tiny import make_tiny_model, tiny_model_dir

    root = tmp_path_factory.mktemp("adapters")
    base = tiny_model_dir()
    other = make_tiny_model(root / "other-base", hidden_size=32, intermediate_size=64)
    return {"base": base, "other_base": other,
            "r8": random_lora_adapter(root / "r8", base, r=8),
            "r4": random_lora_adapter(root / "r4", base, seed=1, r=4),
            "other": random_lora_adapter(root / "other", other, r=4)}


def test_adapter_given_as_model(work, capsys, adapters):
    expect_error(train_args(work, f"model.name={adapters['r8']}"), 2, "is a LoRA adapter, not a base model",
                 capsys=capsys, root=work)


def test_invalid_lora_targets(work, capsys):
    expect_error(train_args(work, "lora.target_modules=[qkv_proj]"), 2, "lora.target_modules", "matched no module",
                 capsys=capsys, root=work)


def test_quantization_where_bitsandbytes_cannot_run(work, capsys, monkeypatch):
    import finetune.models.load as model_mod

    class BrokenBnb:
        __version__ = "0.0-simulated"

        class functional:
            @staticmethod
            def quantize_4bit(*a, **k):
                raise RuntimeError("no 4-bit kernel for this device (simulated)")

    monkeypatch.setattr(model_mod, "_import_bnb", lambda: BrokenBnb)
    monkeypatch.setattr(model_mod, "_PROBED", {})
    expect_error(train_args(work, "quant.mode=nf4"), 1, "quant.mode=nf4 cannot run on cpu", "quant.mode=none",
                 capsys=capsys, root=work)


def test_quantization_without_bitsandbytes(work, capsys, monkeypatch):
    import finetune.models.load as model_mod

    def missing():
        raise ImportError("No module named 'bitsandbytes'")

    monkeypatch.setattr(model_mod, "_import_bnb", missing)
    monkeypatch.setattr(model_mod, "_PROBED", {})
    expect_error(train_args(work, "quant.mode=int8"), 1, "quant.mode=int8 needs bitsandbytes",
                 capsys=capsys, root=work)


# --------------------------------------------------------------------------- out_dir and resume


def test_existing_out_dir_without_resume_or_overwrite(work, capsys):
    out = work / "out"
    (out / "logs").mkdir(parents=True)  # an earlier run's
    (out / "logs" / "metrics.csv").write_text("step,loss\n1,2.0\n")
    expect_error(train_args(work), 2, "out_dir", "is not empty", "resume=auto", "overwrite=true",
                 capsys=capsys, root=work)
    # a folder of the user's own files: resume/overwrite would not help, so they are not suggested
    (out / "logs").rename(work / "old-logs")
    (out / "important.bin").write_bytes(b"\x00" * 100)
    err = expect_error(train_args(work), 2, "holds files finetune did not write: important.bin",
                       capsys=capsys, root=work)
    assert "overwrite=true" not in err


def test_out_dir_is_a_file(work, capsys):
    f = work / "out"
    f.write_text("not a folder")
    expect_error(train_args(work), 2, "exists and is not a directory", capsys=capsys, root=work)


def test_resume_from_something_not_a_checkpoint(work, capsys):
    (work / "ckpt").mkdir()
    (work / "ckpt" / "file.txt").write_text("x")
    expect_error(train_args(work, f"resume={work / 'ckpt'}"), 2, "resume=", "not a complete checkpoint",
                 capsys=capsys, root=work)


# --------------------------------------------------------------------------- merge, eval, MoE


def test_merge_nonexistent_adapter(work, capsys):
    expect_error(["merge", f"adapter={work / 'nope'}", f"out_dir={work / 'merged'}"], 2,
                 "adapter directory not found", "nope", capsys=capsys, root=work)


def test_merge_adapter_for_another_base(work, capsys, adapters):
    # An adapter whose config names the tiny base but whose tensors were trained on another one.
    wrong = work / "wrong-base"
    shutil.copytree(adapters["other"], wrong)
    cfg = json.loads((wrong / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(adapters["base"])
    (wrong / "adapter_config.json").write_text(json.dumps(cfg))
    args = ["merge", f"adapter={wrong}", f"out_dir={work / 'merged'}"]
    expect_error(args, 2, "wrong-base", "does not fit", capsys=capsys, root=work)


def test_eval_adapter_for_another_base(work, capsys, adapters):
    expect_error(["eval", "suite=tiny", f"models=[{adapters['other']}]", f"base_model={adapters['base']}",
                  f"out_dir={work / 'eval'}", "progress=false"], 2, "trained on", str(adapters["other_base"]),
                 capsys=capsys, root=work)


def test_combine_adapters_with_different_ranks(work, capsys, adapters):
    expect_error(["merge", f"adapters=[{adapters['r8']},{adapters['r4']}]", "method=linear",
                  f"out_dir={work / 'combined'}"], 2, "needs equal LoRA ranks", "r=8", "r=4",
                 capsys=capsys, root=work)


def test_combine_adapters_on_different_bases(work, capsys, adapters):
    expect_error(["merge", f"adapters=[{adapters['r4']},{adapters['other']}]", "method=cat",
                  f"out_dir={work / 'combined'}"], 2, "different base models", capsys=capsys, root=work)


def test_merge_into_non_empty_out_dir(work, capsys, adapters):
    out = work / "merged"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"precious")
    expect_error(["merge", f"adapter={adapters['r8']}", f"out_dir={out}"], 2, "is not empty", capsys=capsys, root=work)


def test_moe_expert_of_another_architecture(work, capsys, adapters, tmp_path_factory):
    from finetune.models.tiny import make_tiny_model

    qwen = make_tiny_model(tmp_path_factory.mktemp("q") / "tiny-qwen2", arch="qwen2")
    spec = work / "moe.yaml"
    spec.write_text(f"base_model: {adapters['base']}\ngate_mode: random\nexperts:\n"
                    f"  - source_model: {adapters['base']}\n  - source_model: {qwen}\n")
    expect_error(["moe", f"config={spec}", f"out_dir={work / 'moe'}"], 2, "experts[1]", "qwen2", "llama",
                 capsys=capsys, root=work)


def test_debug_shows_the_traceback(work):
    from finetune.errors import UsageError

    with pytest.raises(UsageError, match="unknown recipe"):
        cli_main(["recipe=tiny-lroa", "--debug"])


def test_unknown_command(work, capsys):
    expect_error(["mrege"], 2, "unknown command 'mrege'", "did you mean merge", capsys=capsys, root=work)
