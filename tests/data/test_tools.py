"""Tool calls and OpenAI messages: rendered by the template's own tool support, or the fallback.

Expected strings are written by hand from TOOLS_TEMPLATE (helpers.py, the shape of Qwen2.5's
template) and from ChatML (the tiny tokenizer's template, which has no tool support)."""

import json

import pytest
from helpers import TOOLS_TEMPLATE, seen

from finetune.config import DataConfig
from finetune.data.formats import BadRow, columns_for, to_conversation
from finetune.data.pipeline import prepare
from finetune.data.tokenize import Renderer

TOOLS = '[{"name": "w", "parameters": {}}]'
SHAREGPT = {"conversations": [{"from": "human", "value": "w?"},
                              {"from": "function_call", "value": '{"name": "w", "arguments": {"city": "Oslo"}}'},
                              {"from": "observation", "value": '{"t": 3}'}, {"from": "gpt", "value": "3 C"}],
            "tools": TOOLS}
CALL = {"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"city": "Oslo"}'}}


def openai(content=None, **assistant):
    return {"messages": [{"role": "user", "content": "w?"},
                         {"role": "assistant", "content": content, "tool_calls": [CALL], **assistant},
                         {"role": "tool", "tool_call_id": "c1", "content": '{"t": 3}'},
                         {"role": "assistant", "content": "3 C"}],
            "tools": [{"type": "function", "function": {"name": "w", "parameters": {}}}]}


def conv(row, fmt, fixes=None):
    return to_conversation(row, fmt, columns_for(fmt), fixes=fixes)


@pytest.fixture
def tools_tok():
    from finetune.models.tiny import byte_tokenizer

    tk = byte_tokenizer()
    tk.chat_template = TOOLS_TEMPLATE
    return tk


TOOLS_TEXT = ('<|im_start|>system\n# Tools\n<tools>\n{"type": "function", "function": {"name": "w", "parameters": {}}}\n'
              '</tools><|im_end|>\n'
              '<|im_start|>user\nw?<|im_end|>\n'
              '<|im_start|>assistant\n<tool_call>\n{"name": "w", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n'
              '<|im_start|>user\n<tool_response>\n{"t": 3}\n</tool_response><|im_end|>\n'
              '<|im_start|>assistant\n3 C<|im_end|>\n')
TOOLS_TRAINED = ['<tool_call>\n{"name": "w", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>', "3 C<|im_end|>"]


@pytest.mark.parametrize("row, fmt", [(SHAREGPT, "sharegpt"), (openai(None), "messages"), (openai(""), "messages")])
def test_tool_calls_in_the_templates_own_format(tools_tok, row, fmt):
    r = Renderer(tools_tok)
    out = seen(r, conv(row, fmt))
    assert out["text"] == TOOLS_TEXT
    assert out["trained"] == TOOLS_TRAINED  # the call with its tags; the tool result never
    assert not r.tool_fallback(conv(row, fmt))


def test_text_and_tool_calls_in_one_assistant_turn(tools_tok):
    out = seen(Renderer(tools_tok), conv(openai("Checking."), "messages"))
    assert out["trained"][0] == ('Checking.\n<tool_call>\n{"name": "w", "arguments": {"city": "Oslo"}}\n'
                                 '</tool_call><|im_end|>')
    # ShareGPT: a gpt turn followed by its function_call is the same one assistant message
    row = {"conversations": [SHAREGPT["conversations"][0], {"from": "gpt", "value": "Checking."},
                             *SHAREGPT["conversations"][1:]], "tools": TOOLS}
    assert seen(Renderer(tools_tok), conv(row, "sharegpt"))["trained"][0] == out["trained"][0]


FALLBACK_TEXT = ('<|im_start|>system\nYou have access to the following tools:\n'
                 '[{"type": "function", "function": {"name": "w", "parameters": {}}}]<|im_end|>\n'
                 '<|im_start|>user\nw?<|im_end|>\n'
                 '<|im_start|>assistant\n{"name": "w", "arguments": {"city": "Oslo"}}<|im_end|>\n'
                 '<|im_start|>tool\n{"t": 3}<|im_end|>\n'
                 '<|im_start|>assistant\n3 C<|im_end|>\n')


@pytest.mark.parametrize("row, fmt", [(SHAREGPT, "sharegpt"), (openai(None), "messages")])
def test_template_without_tools_uses_the_documented_fallback(tok, row, fmt):
    r = Renderer(tok)  # ChatML: no tools, no tool_calls
    out = seen(r, conv(row, fmt))
    assert out["text"] == FALLBACK_TEXT
    assert out["trained"] == ['{"name": "w", "arguments": {"city": "Oslo"}}<|im_end|>', "3 C<|im_end|>"]
    assert r.tool_fallback(conv(row, fmt))


def test_tool_use_is_counted_in_the_stats(tmp_path, tok, tools_tok):
    p = tmp_path / "t.json"
    p.write_text(json.dumps([SHAREGPT, {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]))
    cfg = DataConfig(path=str(p), format="sharegpt", val_fraction=0.0, seq_len=512)
    s = prepare(cfg, tok, seed=0, progress=False).stats
    assert (s.tool_rows, s.tool_fallback) == (1, 1) and "by the fallback" in str(s)
    s = prepare(cfg, tools_tok, seed=0, progress=False).stats
    assert (s.tool_rows, s.tool_fallback) == (1, 0) and "all in the template's own format" in str(s)


def test_openai_content_parts():
    fixes = []
    c = conv({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                        {"type": "image_url", "image_url": {"url": "x"}},
                                                        {"type": "text", "text": "b"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "c"}]}]}, "messages", fixes)
    assert [m["content"] for m in c.messages] == ["a\nb", "c"]
    assert fixes == ["fixed: image_url content part dropped"]
    with pytest.raises(BadRow, match="only non-text content"):
        conv({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
                           {"role": "assistant", "content": "c"}]}, "messages")


@pytest.mark.parametrize("row, fmt, reason", [
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "not json"}]},
     "sharegpt", "bad tool call"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": '{"arguments": {}}'}]},
     "sharegpt", "bad tool call"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}, "messages",
     "missing field"),
    ({"system": "A", "conversations": [{"from": "system", "value": "B"}, {"from": "human", "value": "q"},
                                       {"from": "gpt", "value": "a"}]}, "sharegpt", "two system prompts"),
])
def test_true_reasons(row, fmt, reason):
    with pytest.raises(BadRow) as e:
        conv(row, fmt)
    assert e.value.reason == reason


def test_trailing_tool_turn_is_named_and_same_system_twice_is_kept():
    fixes = []
    c = conv({"conversations": SHAREGPT["conversations"][:3]}, "sharegpt", fixes)
    assert fixes == ["fixed: trailing tool turn trimmed"] and c.messages[-1]["tool_calls"]
    c = conv({"system": "A", "conversations": [{"from": "system", "value": "A"}, {"from": "human", "value": "q"},
                                               {"from": "gpt", "value": "a"}]}, "sharegpt")
    assert c.system == "A"
