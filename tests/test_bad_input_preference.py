"""Bad preference data (docs/bad-input.md, rows P*): with data.strict=true each bad row is refused in
one line naming the row and the field, exit 2, nothing written; without it the row is dropped and
counted by reason. Through `finetune data` with a preference objective (the same
finetune.data.preference that training's preference objectives call).

The harness (expect_error, run_cli, the `work` folder) is tests/test_bad_input.py's.
"""

from __future__ import annotations

import json

import pytest

from test_bad_input import _wide_console, expect_error, run_cli, work, write_jsonl  # noqa: F401 (fixtures)

U = lambda s: {"role": "user", "content": s}  # noqa: E731
A = lambda s: {"role": "assistant", "content": s}  # noqa: E731
GOOD = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}


def pref_args(work, rows, *extra, objective="dpo", strict=True):
    f = write_jsonl(work / "pairs.jsonl", rows)
    return ["data", "recipe=tiny-lora", "n=0", f"train.objective={objective}", f"data.path={f}",
            f"data.strict={str(strict).lower()}", "data.cache=false", "output.progress=false", *extra]


# (row, the error's tail after 'pairs.jsonl line 2:'), each the second row after a good one
STRICT = [
    ({"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Hi!"},
     "field 'rejected' identical chosen and rejected (data.strict=true)"),
    ({"prompt": "Say hi.", "chosen": "Hi!"}, "field 'rejected' missing side: absent (data.strict=true)"),
    ({"prompt": "Say hi.", "chosen": "", "rejected": "No."}, "field 'chosen' missing side: empty (data.strict=true)"),
    ({"chosen": [U("Say hi."), A("Hi!")], "rejected": [U("Say bye."), A("Bye!")]},
     "field 'rejected' prompts differ between chosen and rejected (data.strict=true)"),
    ({"prompt": "Say yo.", "chosen": [U("Say hi."), A("Hi!")], "rejected": [U("Say hi."), A("No.")]},
     "field 'chosen' prompt differs from the conversations (data.strict=true)"),
    ({"prompt": "Say hi.", "chosen": [A("Hi!"), A("Hi again!")], "rejected": "No."},
     "field 'chosen' answer is not one assistant turn: got assistant, assistant (data.strict=true)"),
    ({"prompt": [U("Say hi."), A("Hi!")], "chosen": "Hi!", "rejected": "No."},
     "prompt ends with an assistant turn: the answer would follow another answer (data.strict=true)"),
    ({"prompt": [{"role": "system", "content": "Be kind."}], "chosen": "Hi!", "rejected": "No."},
     "empty prompt: no user turn before the answer (data.strict=true)"),
]


@pytest.mark.parametrize("row,says", STRICT, ids=[s.split(" (data")[0][:50] for _, s in STRICT])
def test_bad_pair_strict(work, capsys, row, says):
    expect_error(pref_args(work, [GOOD, row]), 2, f"pairs.jsonl line 2: {says}", capsys=capsys, root=work)


def test_bad_pairs_lenient_are_dropped_and_counted(work, capsys):
    rows = [GOOD] + [r for r, _ in STRICT]
    rc, out, err = run_cli(pref_args(work, rows, "data.val_fraction=0", strict=False), capsys)
    assert rc == 0, err
    assert any(line.split("│")[1:3] and "train pairs" in line and line.split("│")[2].strip() == "1"
               for line in out.splitlines())
    for reason in ("identical chosen and rejected", "missing side", "prompts differ between chosen and rejected",
                   "prompt differs from the conversations", "answer is not one assistant turn",
                   "prompt ends with an assistant turn", "empty prompt"):
        assert reason in out
    assert "missing side" in out and "2  (first:" in out  # two rows dropped as missing side, the first named


def test_label_not_a_boolean_strict(work, capsys):
    rows = [{"messages": [U("q"), A("a")], "label": True}, {"messages": [U("q"), A("a")], "label": "yes"}]
    expect_error(pref_args(work, rows, objective="kto"), 2,
                 "pairs.jsonl line 2: field 'label' wrong type: expected true or false, got str (data.strict=true)",
                 capsys=capsys, root=work)


def test_too_long_with_drop_strict(work, capsys):
    rows = [GOOD, {"prompt": "x" * 300, "chosen": "Hi!", "rejected": "No."}]
    expect_error(pref_args(work, rows, "data.seq_len=64", "data.truncation=drop"), 2,
                 "pairs.jsonl line 2: too long: ", "> seq_len 64 (data.strict=true)", capsys=capsys, root=work)


def test_long_prompt_is_cut_from_the_left_and_counted(work, capsys):
    rows = [GOOD, {"prompt": "x" * 300, "chosen": "Hi!", "rejected": "No."}]
    rc, out, err = run_cli(pref_args(work, rows, "data.seq_len=64", "data.val_fraction=0", strict=False), capsys)
    assert rc == 0, err
    assert "truncated" in out and "1 (seq_len 64)" in out


def test_pair_objective_on_unpaired_feedback(work, capsys):
    rows = [{"messages": [U("q"), A("a")], "label": True}]
    expect_error(pref_args(work, rows), 2, "pairs.jsonl: dpo, orpo and simpo train on pairs",
                 "use train.objective=kto", capsys=capsys, root=work)


def test_format_not_detectable(work, capsys):
    expect_error(pref_args(work, [{"question": "q", "answer": "a"}]), 2,
                 "cannot tell the preference format from the first row (columns: answer, question); set data.format",
                 capsys=capsys, root=work)


def test_supervised_format_under_a_preference_objective(work, capsys):
    expect_error(pref_args(work, [GOOD], "data.format=alpaca"), 2,
                 "data.format=alpaca is not a preference format (expected one of sharegpt, messages, trl, openai",
                 capsys=capsys, root=work)


def test_preference_format_under_sft(work, capsys):
    expect_error(pref_args(work, [GOOD], "data.format=trl", objective="sft"), 2,
                 "data.format=trl is a preference format: train it with train.objective=dpo, orpo, simpo or kto",
                 capsys=capsys, root=work)


def test_train_on_prompt_under_a_preference_objective(work, capsys):
    expect_error(pref_args(work, [GOOD], "data.train_on_prompt=true"), 2,
                 "data.train_on_prompt=true: preference objectives count only the answers' tokens",
                 capsys=capsys, root=work)


def test_unknown_preference_column(work, capsys):
    expect_error(pref_args(work, [GOOD], "data.columns={instruction: q}"), 2,
                 "data.columns: 'instruction' is not a trl preference column", capsys=capsys, root=work)
