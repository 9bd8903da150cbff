import typing

import pytest

from finetune.data.formats import (
    ADAPTERS,
    PREFERENCE_ONLY,
    BadRow,
    Conversation,
    Format,
    columns_for,
    detect_format,
    to_conversation,
)
from finetune.errors import UsageError


def test_the_format_setting_names_every_adapter():
    # data.format, a card's and a suite task's: the SFT adapters plus the preference-only formats
    assert set(typing.get_args(Format)) == set(ADAPTERS) | set(PREFERENCE_ONLY)


def test_a_preference_format_under_sft_says_which_objective():
    with pytest.raises(UsageError, match="data.format=trl is a preference format: train it with train.objective=dpo"):
        columns_for("trl")


def conv(row, fmt, roles=None, columns=None, fixes=None):
    return to_conversation(row, fmt, columns_for(fmt, columns), roles, fixes=fixes)


def test_alpaca_with_input_system_history():
    c = conv({"instruction": "Add", "input": "1 and 2", "output": "3", "system": "Be brief",
              "history": [["Hi", "Hello"]]}, "alpaca")
    assert c.system == "Be brief"
    assert c.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                          {"role": "user", "content": "Add\n\n1 and 2", "instruction": "Add", "input": "1 and 2"},
                          {"role": "assistant", "content": "3"}]


def test_alpaca_column_mapping():
    c = conv({"q": "Why?", "a": "Because."}, "alpaca", columns={"instruction": "q", "output": "a"})
    assert c.messages[-1] == {"role": "assistant", "content": "Because."}
    with pytest.raises(UsageError, match="not a alpaca column"):
        columns_for("alpaca", {"question": "q"})


def test_sharegpt_roles_tools_and_function_call():
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "weather?"},
                             {"from": "function_call", "value": '{"name": "w"}'},
                             {"from": "observation", "value": '{"t": 3}'}, {"from": "chatgpt", "value": "3 C"}],
           "tools": '[{"name": "w"}]'}
    c = conv(row, "sharegpt")
    assert c.system == "S" and c.tools == [{"type": "function", "function": {"name": "w"}}]
    assert [m["role"] for m in c.messages] == ["user", "assistant", "tool", "assistant"]
    assert c.messages[1] == {"role": "assistant", "content": "",
                             "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": {}}}]}


def test_sharegpt_custom_role():
    c = conv({"conversations": [{"from": "me", "value": "a"}, {"from": "bot", "value": "b"}]}, "sharegpt",
             roles={"me": "user", "bot": "assistant"})
    assert [m["role"] for m in c.messages] == ["user", "assistant"]


def test_sharegpt_messy_fixes_are_counted():
    fixes = []
    c = conv({"conversations": [{"from": "gpt", "value": "hello!"}, {"from": "human", "value": "q"},
                                {"from": "gpt", "value": "a"}, {"from": "human", "value": "unanswered"}]},
             "sharegpt", fixes=fixes)
    assert [m["content"] for m in c.messages] == ["q", "a"]
    assert fixes == ["fixed: leading assistant turn dropped", "fixed: trailing user turn trimmed"]


def test_messages_and_prompt_completion_and_text():
    c = conv({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u"},
                           {"role": "assistant", "content": "a"}]}, "messages")
    assert c.system == "S" and len(c.messages) == 2
    c = conv({"prompt": "p", "completion": "c"}, "prompt_completion")
    assert c.messages == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]
    assert conv({"text": "hello"}, "text") == Conversation(text="hello")


@pytest.mark.parametrize("row, fmt, reason", [
    ({"instruction": "i"}, "alpaca", "missing field"),
    ({"instruction": "i", "output": 3}, "alpaca", "wrong type"),
    ({"instruction": "i", "output": "  "}, "alpaca", "empty turn"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "sharegpt", "unknown role"),
    ({"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "a"}]}, "sharegpt", "empty turn"),
    ({"conversations": [{"from": "human", "value": "only a question"}]}, "sharegpt", "no assistant turn"),
    ({"conversations": "human: hi"}, "sharegpt", "conversation not a list"),
    ({"conversations": []}, "sharegpt", "empty conversation"),
    ({"conversations": [{"from": "human"}]}, "sharegpt", "missing field"),
    ({"conversations": [["human", "hi"]]}, "sharegpt", "wrong type"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}, "messages", "wrong type"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "{bad"},
     "sharegpt", "wrong type"),
    (["not", "a", "dict"], "alpaca", "wrong type"),
])
def test_bad_rows_have_reasons(row, fmt, reason):
    with pytest.raises(BadRow) as e:
        conv(row, fmt)
    assert e.value.reason == reason


# --------------------------------------------------------------------------- rows of any format, maybe unanswered


@pytest.mark.parametrize("row, fmt", [
    ({"messages": [], "text": "t"}, "messages"), ({"conversations": []}, "sharegpt"),
    ({"instruction": "i", "text": "t"}, "alpaca"), ({"text": "t", "prompt": "p"}, "text"),
    ({"prompt": "p"}, "prompt_completion"), ({"messages": None, "text": "t"}, "text"), ({"answer": "a"}, None),
])
def test_detect_format_by_column(row, fmt):
    assert detect_format(row) == fmt


def test_unanswered_rows_keep_their_prompt():
    def prompt(row):
        fmt = detect_format(row)
        return to_conversation(row, fmt, columns_for(fmt), answered=False)

    c = prompt({"instruction": "Add", "input": "1 and 2"})
    assert c.messages == [{"role": "user", "content": "Add\n\n1 and 2", "instruction": "Add", "input": "1 and 2"}]
    assert prompt({"prompt": "p", "system": "S"}).chat() == [{"role": "system", "content": "S"},
                                                            {"role": "user", "content": "p"}]
    c = prompt({"conversations": [{"from": "system", "value": "S"}, {"from": "bing", "value": "hi"},
                                  {"from": "human", "value": "q"}, {"from": "observation", "value": "o"}]})
    assert c.system == "S" and [m["role"] for m in c.messages] == ["assistant", "user", "tool"]  # nothing trimmed
    c = prompt({"messages": [{"role": "user", "content": "q"}], "answer": "4"})
    assert c.messages == [{"role": "user", "content": "q"}]
    assert prompt({"prompt": "p", "completion": "c"}).messages[-1] == {"role": "assistant", "content": "c"}
    with pytest.raises(BadRow, match="wrong type: output"):
        prompt({"instruction": "Add", "output": 3})  # an answer that is there is still checked
    with pytest.raises(BadRow, match="unknown role"):
        prompt({"conversations": [{"from": "robot", "value": "x"}]})
    with pytest.raises(BadRow, match="no assistant turn"):  # training still needs the answer
        to_conversation({"messages": [{"role": "user", "content": "q"}]}, "messages", columns_for("messages"))
