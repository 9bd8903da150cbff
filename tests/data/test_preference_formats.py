"""Preference rows of every format -> PrefExample, detection, and the drop reasons."""

import json

import pytest

from finetune.data.formats import BadRow
from finetune.data.preference_formats import (
    detect_preference_format,
    pref_columns,
    read_preference_rows,
    to_preference,
)
from finetune.errors import UsageError

U = lambda s: {"role": "user", "content": s}  # noqa: E731
A = lambda s: {"role": "assistant", "content": s}  # noqa: E731


def ex(row, fmt=None, columns=None, **kw):
    fmt = fmt or detect_preference_format(row)
    return to_preference(row, fmt, pref_columns(fmt, columns), **kw)


def test_sharegpt_pairs_as_dpo_en_demo():
    e = ex({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q1"},
                              {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"}],
            "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}})
    assert e.prompt.system == "S" and e.prompt.messages == [U("q1"), A("a1"), U("q2")]
    assert (e.chosen, e.rejected) == (A("good"), A("bad")) and e.paired


def test_sharegpt_sides_as_strings_or_one_turn_lists():
    e = ex({"conversations": [{"from": "human", "value": "q"}], "chosen": "good",
            "rejected": [{"from": "gpt", "value": "bad"}]}, "sharegpt")
    assert (e.chosen, e.rejected) == (A("good"), A("bad"))


def test_sharegpt_unpaired_with_kto_tag():
    e = ex({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "kto_tag": False},
           "sharegpt", columns={"label": "kto_tag"})
    assert e.prompt.messages == [U("q")] and e.completion == A("a") and e.label is False and not e.paired


def test_messages_with_label_as_kto_en_demo():
    e = ex({"messages": [U("q"), A("a")], "label": True})
    assert e.completion == A("a") and e.label is True


def test_trl_strings():
    e = ex({"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert e.prompt.messages == [U("q")] and (e.chosen, e.rejected) == (A("good"), A("bad"))


def test_trl_message_lists_with_system_and_tools():
    tools = [{"type": "function", "function": {"name": "w"}}]
    e = ex({"prompt": [{"role": "system", "content": "S"}, U("q")], "chosen": [A("good")],
            "rejected": [A("bad")], "tools": tools})
    assert e.prompt.system == "S" and e.prompt.tools == tools and e.chosen == A("good")


def test_trl_implicit_prompt_conversations():
    e = ex({"chosen": [U("q"), A("good")], "rejected": [U("q"), A("bad")]})
    assert e.prompt.messages == [U("q")] and (e.chosen, e.rejected) == (A("good"), A("bad"))


def test_trl_implicit_prompt_texts_as_trl_extracts_it():
    e = ex({"chosen": "Human: hi Assistant: hello there", "rejected": "Human: hi Assistant: go away"})
    assert e.prompt.messages == [U("Human: hi Assistant:")]
    assert (e.chosen["content"], e.rejected["content"]) == (" hello there", " go away")


def test_trl_ultrafeedback_shape_prompt_column_and_whole_conversations():
    row = {"prompt": "q", "prompt_id": "x", "chosen": [U("q"), A("good")], "rejected": [U("q"), A("bad")],
           "messages": [U("q"), A("good")], "score_chosen": 8.0, "score_rejected": 3.0}
    assert detect_preference_format(row) == "trl"
    e = ex(row)
    assert e.prompt.messages == [U("q")] and e.chosen == A("good")


def test_trl_unpaired():
    e = ex({"prompt": [U("q")], "completion": [A("a")], "label": True})
    assert e.completion == A("a") and e.label is True
    e = ex({"prompt": "q", "completion": "a", "label": False})
    assert e.prompt.messages == [U("q")] and e.label is False


def test_orca_dpo_pairs_columns():
    e = ex({"system": "", "question": "q", "chosen": "good", "rejected": "bad"}, "trl", columns={"prompt": "question"})
    assert e.prompt.system is None and e.prompt.messages == [U("q")]


def test_openai_preference_jsonl():
    row = {"input": {"messages": [U("q")], "tools": [], "parallel_tool_calls": True},
           "preferred_output": [A("good")], "non_preferred_output": [A("bad")]}
    assert detect_preference_format(row) == "openai"
    e = ex(row)
    assert e.prompt.messages == [U("q")] and (e.chosen, e.rejected) == (A("good"), A("bad"))


def test_answer_with_tool_calls_stays_structured():
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                                "function": {"name": "w", "arguments": "{\"c\": 1}"}}]}
    e = ex({"prompt": [U("q")], "chosen": [call], "rejected": [A("no")]})
    assert e.chosen["tool_calls"][0]["function"] == {"name": "w", "arguments": {"c": 1}}


def test_system_prompt_setting_fills_a_missing_one():
    assert ex({"prompt": "q", "chosen": "a", "rejected": "b"}, system_prompt="Be kind").prompt.system == "Be kind"


# ------------------------------------------------------------------------------ drops


@pytest.mark.parametrize("row,reason,field", [
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"}},
     "missing side", "rejected"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "missing side", "chosen"),
    ({"prompt": "q", "chosen": "same", "rejected": "same "}, "identical chosen and rejected", "rejected"),
    ({"chosen": [U("q1"), A("a")], "rejected": [U("q2"), A("b")]}, "prompts differ between chosen and rejected",
     "rejected"),
    ({"prompt": "other", "chosen": [U("q"), A("a")], "rejected": [U("q"), A("b")]},
     "prompt differs from the conversations", "chosen"),
    ({"prompt": "q", "chosen": [A("a"), A("b")], "rejected": "c"}, "answer is not one assistant turn", "chosen"),
    ({"prompt": [U("q"), A("x")], "chosen": "a", "rejected": "b"}, "prompt ends with an assistant turn", ""),
    ({"prompt": [{"role": "system", "content": "S"}], "chosen": "a", "rejected": "b"}, "empty prompt", ""),
    ({"messages": [U("q"), A("a")], "label": "yes"}, "wrong type", "label"),
    ({"messages": [U("q")], "label": True}, "missing side", "messages"),
])
def test_drop_reasons(row, reason, field):
    with pytest.raises(BadRow) as e:
        ex(row)
    assert (e.value.reason, e.value.field) == (reason, field)


def test_read_preference_rows_strict_and_lenient(tmp_path):
    p = tmp_path / "held.jsonl"
    p.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                 + json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n")
    with pytest.raises(UsageError, match=r"held.jsonl line 2: field 'rejected' identical chosen and rejected"):
        read_preference_rows(p)
    got = read_preference_rows(p, strict=False)
    assert len(got.examples) == 1 and got.dropped == {"identical chosen and rejected": 1} and got.format == "trl"


def test_undetectable_rows_are_refused_in_one_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(UsageError, match="cannot tell the preference format .*columns: answer, question"):
        read_preference_rows(p)


def test_unknown_column_override_refused():
    with pytest.raises(UsageError, match="'instruction' is not a trl preference column"):
        pref_columns("trl", {"instruction": "q"})
    with pytest.raises(UsageError, match="data.format=alpaca is not a preference format"):
        pref_columns("alpaca")


def test_shipped_heldout_pairs_are_disjoint_from_the_sample():
    held = read_preference_rows("eval/data/pref-sample.jsonl")
    train = read_preference_rows("datasets/samples/preference_sample.json", what="data")
    assert len(held.examples) == 20 and len(train.examples) == 48
    key = lambda e: json.dumps(e.prompt.messages)  # noqa: E731
    assert not {key(e) for e in held.examples} & {key(e) for e in train.examples}
