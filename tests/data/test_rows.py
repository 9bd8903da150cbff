"""The one JSON/JSONL row reader (finetune.data.rows): one wrapper rule, and the same rows for
training data, eval data and the MoE routing report; messages name what was read."""

import json

import pytest

from finetune.config import DataConfig
from finetune.data.rows import read_json_rows
from finetune.data.sources import Source, load_rows
from finetune.errors import UsageError
from finetune.eval.prompting import load_examples
from finetune.eval.suites import TaskSpec
from finetune.moe.report import read_rows

ROWS = [{"prompt": "2+2?", "answer": "4"}, {"prompt": "3+3?", "answer": "6"}, {"prompt": "1+1?", "answer": "2"}]
LINES = "\n".join(json.dumps(r) for r in ROWS) + "\n"


def _write(tmp_path, name, text, bom=False):
    p = tmp_path / name
    p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return p


SHAPES = {
    "list.json": json.dumps(ROWS, indent=1),
    "wrapped.json": json.dumps({"rows": ROWS, "version": 2}),
    "data-wrapper.json": json.dumps({"data": ROWS}),
    "lines.jsonl": LINES,
    "blank-lines.jsonl": "\n" + LINES.replace("\n", "\n\n"),
    "lines-saved-as.json": LINES,
}


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("bom", [False, True])
def test_every_shape_gives_the_rows(tmp_path, name, bom):
    got = read_json_rows(_write(tmp_path, name, SHAPES[name], bom), "data")
    assert got.rows == ROWS and not got.broken and len(got.where) == 3


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_data_eval_and_report_read_the_same_rows(tmp_path, name):
    p = _write(tmp_path, name, SHAPES[name])
    data = load_rows(Source(format="prompt_completion", files=[p])).rows
    task = TaskSpec(name="t", data=str(p), metrics=["loss"])
    task.data_path = p  # what load_suite resolves `data` to
    examples = load_examples(task, DataConfig())
    report = read_rows(str(p))
    assert data == report == ROWS
    assert [(e.messages[0]["content"], e.answer) for e in examples] == [(r["prompt"], r["answer"]) for r in ROWS]


def test_where_names_line_or_row(tmp_path):
    p = _write(tmp_path, "d.jsonl", "\n" + LINES)
    assert read_json_rows(p, "data").where == [f"{p} line {n}" for n in (2, 3, 4)]
    p = _write(tmp_path, "d.json", json.dumps({"rows": ROWS}))
    assert read_json_rows(p, "data").where == [f"{p} row {n}" for n in (1, 2, 3)]


@pytest.mark.parametrize("content, got", [
    ({"rows": ROWS, "more": []}, "an object"),     # two lists: which one is the rows?
    ({"prompt": "2+2?", "answer": "4"}, "an object"),  # one row, no list
    (3, "int"), ("rows", "str"), (None, "NoneType"),
])
def test_wrapper_rule_refuses_anything_else(tmp_path, content, got):
    p = _write(tmp_path, "x.json", json.dumps(content))
    for what in ("data", "eval data", "report data"):
        with pytest.raises(UsageError, match=rf"^{what} .*x\.json: expected a JSON list of rows "
                                             rf"\(or an object holding one list\), got {got}$"):
            read_json_rows(p, what)


def test_invalid_json_names_what_file_line_and_col(tmp_path):
    p = _write(tmp_path, "bad.json", '[\n {"a": 1},\n {"a": }\n]')
    with pytest.raises(UsageError, match=r"^eval data .*bad\.json line 3 col 8: invalid JSON \(Expecting value\)$"):
        read_json_rows(p, "eval data")
    p = _write(tmp_path, "bad.jsonl", LINES + '{"prompt": \n')
    with pytest.raises(UsageError, match=r"^report data .*bad\.jsonl line 4 col \d+: invalid JSON"):
        read_json_rows(p, "report data")


def test_lenient_keeps_going_past_a_broken_line(tmp_path):
    p = _write(tmp_path, "d.jsonl", LINES + "{oops\n" + json.dumps(ROWS[0]) + "\n")
    got = read_json_rows(p, "data", strict=False)
    assert got.rows == ROWS + ROWS[:1] and got.broken == [(f"{p} line 4", "Expecting property name enclosed "
                                                                             "in double quotes")]
    assert got.where[-1] == f"{p} line 5"


def test_appends_to_rows_already_read(tmp_path):
    out = read_json_rows(_write(tmp_path, "a.jsonl", LINES), "data")
    read_json_rows(_write(tmp_path, "b.json", json.dumps(ROWS)), "data", out)
    assert out.rows == ROWS + ROWS and out.where[3].endswith("b.json row 1")


def test_reading_failures_name_what(tmp_path):
    p = _write(tmp_path, "bin.jsonl", "")
    p.write_bytes(b'{"a": 1}\n\xff\xfe\n')
    with pytest.raises(UsageError, match=r"^eval data .*bin\.jsonl is not UTF-8 text"):
        read_json_rows(p, "eval data")
