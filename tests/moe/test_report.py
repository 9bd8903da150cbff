"""The routing report's rows (finetune.moe.report): any training format, answered or not, read
through finetune.data's reader and format adapters; malformed rows refused in one line."""

import json
import re

import pytest

from finetune.errors import UsageError
from finetune.models.tiny import byte_tokenizer
from finetune.moe.report import read_rows, row_text


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def chat(tok, *turns):
    return tok.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=False)


def test_every_format_through_the_chat_template(tok):
    assert row_text("raw text", tok) == "raw text"
    assert row_text({"text": "plain"}, tok) == "plain"
    assert row_text({"messages": [{"role": "user", "content": "q"}], "answer": "a"}, tok) == chat(tok, ("user", "q"))
    assert row_text({"instruction": "Add", "input": "2 and 3", "output": "5"}, tok) == \
        chat(tok, ("user", "Add\n\n2 and 3"), ("assistant", "5"))
    assert row_text({"prompt": "p", "completion": "c", "system": "S"}, tok) == \
        chat(tok, ("system", "S"), ("user", "p"), ("assistant", "c"))
    assert row_text({"prompt": "p"}, None) == "p"  # no chat template: the turns' text


@pytest.mark.parametrize("speaker, role", [("human", "user"), ("gpt", "assistant"), ("chatgpt", "assistant"),
                                           ("bing", "assistant"), ("bard", "assistant"), ("model", "assistant"),
                                           ("observation", "tool"), ("function_response", "tool")])
def test_sharegpt_roles_as_in_training(tok, speaker, role):
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": speaker, "value": "v"}]}
    assert row_text(row, tok) == chat(tok, ("user", "q"), (role, "v"))


@pytest.mark.parametrize("row, says", [
    ({"instruction": 42}, "report row field 'instruction' must be a string, got int"),
    ({"messages": ["hi"]}, "report row field 'messages' must be a list of turns"),
    ({"conversations": [{"from": "robot", "value": "x"}]},
     "report row field 'conversations[0].from' unknown role: 'robot'"),
    ({"messages": []}, "report row field 'messages' empty conversation"),
    ({"answer": "a"}, "report row has none of text, messages, conversations, instruction, prompt"),
    (3, "report rows must be strings or objects, got int"),
])
def test_malformed_rows_refused_in_one_line(tok, row, says):
    with pytest.raises(UsageError, match="^" + re.escape(says)) as e:
        row_text(row, tok)
    assert "\n" not in str(e.value)


def test_read_rows_missing_empty_and_capped(tmp_path):
    with pytest.raises(UsageError, match="report data file not found"):
        read_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.json").write_text('{"rows": []}')
    with pytest.raises(UsageError, match="holds no rows"):
        read_rows(str(tmp_path / "empty.json"))
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps({"text": str(i)}) for i in range(5)))
    assert read_rows(str(tmp_path / "r.jsonl"), max_rows=2) == [{"text": "0"}, {"text": "1"}]
