"""Hand-written expected ids/labels per format, other template families, and the mask property."""

import functools

import pytest
from helpers import IM_END, IM_START, X, B, build, chatml_turn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.config import DataConfig
from finetune.data.formats import BadRow, Conversation, columns_for, to_conversation
from finetune.data.tokenize import IGNORE, Renderer, fit_length
from finetune.errors import FinetuneError, UsageError


def tok_row(tok, row, fmt, **kw):
    conv = to_conversation(row, fmt, columns_for(fmt))
    return Renderer(tok, **kw).tokenize(conv)


def test_alpaca_chatml(tok):
    ids, labels = tok_row(tok, {"instruction": "Hi", "input": "there", "output": "Yo"}, "alpaca")
    exp = build(*chatml_turn("user", "Hi\n\nthere"), *chatml_turn("assistant", "Yo", True))
    assert (ids, labels) == exp
    # spelled out once, fully by hand: "<|im_start|>user\nHi..." -> 1, u=117+3 ...
    assert ids[:4] == [IM_START, ord("u") + 3, ord("s") + 3, ord("e") + 3]
    assert labels[-4:] == [ord("Y") + 3, ord("o") + 3, IM_END, X]


def test_sharegpt_multi_turn_every_assistant_turn_trained(tok):
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "a"},
                             {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"},
                             {"from": "gpt", "value": "d"}]}
    ids, labels = tok_row(tok, row, "sharegpt")
    exp = build(*chatml_turn("system", "S"), *chatml_turn("user", "a"), *chatml_turn("assistant", "b", True),
                *chatml_turn("user", "c"), *chatml_turn("assistant", "d", True))
    assert (ids, labels) == exp
    assert [t for t in labels if t != X] == B("b") + [IM_END] + B("d") + [IM_END]


def test_sharegpt_tools_go_into_system_when_template_has_no_tools(tok):
    row = {"conversations": [{"from": "human", "value": "w?"},
                             {"from": "function_call", "value": '{"name": "w", "arguments": "{}"}'},
                             {"from": "observation", "value": "OBS"}, {"from": "gpt", "value": "ok"}],
           "tools": [{"name": "w"}]}
    ids, labels = tok_row(tok, row, "sharegpt")
    system = 'You have access to the following tools:\n[{"type": "function", "function": {"name": "w"}}]'
    exp = build(*chatml_turn("system", system), *chatml_turn("user", "w?"),
                *chatml_turn("assistant", '{"name": "w", "arguments": {}}', True),
                *chatml_turn("tool", "OBS"), *chatml_turn("assistant", "ok", True))
    assert (ids, labels) == exp


def test_tools_passed_to_template_that_supports_them(tok):
    from finetune.models.tiny import byte_tokenizer

    tk = byte_tokenizer()
    tk.chat_template = ("{% if tools %}{{ 'T:' + tools[0]['name'] + '\n' }}{% endif %}" + tk.chat_template)
    conv = Conversation(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                        tools=[{"name": "w"}])
    ids, labels = Renderer(tk).tokenize(conv)
    exp = build((B("T:w\n"), False), *chatml_turn("user", "q"), *chatml_turn("assistant", "a", True))
    assert (ids, labels) == exp


def test_messages_and_prompt_completion(tok):
    row = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "v"}]}
    exp = build(*chatml_turn("user", "u"), *chatml_turn("assistant", "v", True))
    assert tok_row(tok, row, "messages") == exp
    assert tok_row(tok, {"prompt": "u", "completion": "v"}, "prompt_completion") == exp


def test_text_trains_everything_but_first(tok):
    ids, labels = tok_row(tok, {"text": "abc"}, "text")
    assert ids == B("abc") + [IM_END]
    assert labels == [X] + B("bc") + [IM_END]


def test_train_on_prompt(tok):
    ids, labels = tok_row(tok, {"instruction": "Hi", "output": "Yo"}, "alpaca", train_on_prompt=True)
    assert labels == [X] + ids[1:]


def test_alpaca_prompt_style_fallback(tok):
    ids, labels = tok_row(tok, {"instruction": "Hi", "output": "Yo"}, "alpaca", prompt_style="alpaca")
    prompt = ("Below is an instruction that describes a task. Write a response that appropriately completes "
              "the request.\n\n### Instruction:\nHi\n\n### Response:\n")
    assert (ids, labels) == build((B(prompt), False), (B("Yo") + [IM_END], True))


def test_no_template_uses_alpaca_and_unknown_style_errors(tok):
    from finetune.models.tiny import byte_tokenizer

    tk = byte_tokenizer()
    tk.chat_template = None
    assert Renderer(tk).style == "alpaca"
    with pytest.raises(UsageError, match="prompt_style"):
        Renderer(tk, prompt_style="template")


@pytest.mark.slow  # imports all of litgpt (~10 s)
def test_litgpt_prompt_styles():
    from finetune.models.tiny import byte_tokenizer
    from litgpt.prompts import Alpaca

    from finetune.data.styles import AlpacaStyle

    assert AlpacaStyle().apply("x") == Alpaca().apply("x")
    assert AlpacaStyle().apply("x", input="y") == Alpaca().apply("x", input="y")
    tk = byte_tokenizer()
    tk.chat_template = None
    with pytest.raises(UsageError, match="did you mean"):
        Renderer(tk, prompt_style="alpacca")
    assert Renderer(tk, prompt_style="llama3").styled is not None


def test_pad_equal_eos_is_refused():
    from finetune.models.tiny import byte_tokenizer

    tk = byte_tokenizer()
    tk.pad_token = tk.eos_token
    with pytest.raises(FinetuneError, match="pad token"):
        Renderer(tk)


def _family(template: str, **specials):
    from finetune.models.tiny import byte_tokenizer

    tk = byte_tokenizer()
    tk.add_special_tokens(specials)
    tk.chat_template = template
    return tk


LLAMA2 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] | trim + ' [/INST]' }}"
          "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}"
           "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate') }}{% endif %}"
           "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
           "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

TWO_TURNS = Conversation(messages=[{"role": "user", "content": "a "}, {"role": "assistant", "content": "b "},
                                   {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}])


def test_llama2_style_template():
    tk = _family(LLAMA2, bos_token="<s>", eos_token="</s>")
    bos, eos = tk.bos_token_id, tk.eos_token_id
    ids, labels = Renderer(tk).tokenize(TWO_TURNS)
    # the template trims contents: the mask follows what it emits, not the raw strings
    assert (ids, labels) == build(([bos] + B("[INST] a [/INST]"), False), (B(" b ") + [eos], True),
                                  (B("[INST] c [/INST]"), False), (B(" d ") + [eos], True))


def test_mistral_style_template_and_template_errors():
    tk = _family(MISTRAL, bos_token="<s>", eos_token="</s>")
    bos, eos = tk.bos_token_id, tk.eos_token_id
    ids, labels = Renderer(tk).tokenize(TWO_TURNS)
    assert (ids, labels) == build(([bos] + B("[INST] a  [/INST]"), False), (B("b ") + [eos], True),
                                  (B("[INST] c [/INST]"), False), (B("d") + [eos], True))
    bad = Conversation(messages=[{"role": "user", "content": "a"}, {"role": "tool", "content": "t"},
                                 {"role": "assistant", "content": "b"}])
    with pytest.raises(BadRow, match="template error"):
        Renderer(tk).tokenize(bad)


def test_llama3_style_template_trains_up_to_eot_only():
    tk = _family(LLAMA3, bos_token="<|begin_of_text|>",
                 additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    sh, eh, eot = (tk.convert_tokens_to_ids(t) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    conv = Conversation(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}])
    ids, labels = Renderer(tk).tokenize(conv)
    assert (ids, labels) == build(([tk.bos_token_id, sh] + B("user") + [eh] + B("\n\nq") + [eot, sh] + B("assistant")
                                   + [eh] + B("\n\n"), False), (B("r") + [eot], True))
    from finetune.data.pipeline import render_prompt

    assert render_prompt(conv, tk, DataConfig()) == ids[:len(ids) - 2]


def test_render_prompt_chatml(tok):
    from finetune.data.pipeline import render_prompt

    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    exp = [t for p, _ in chatml_turn("system", "S") + chatml_turn("user", "q") for t in p] + [IM_START] + B("assistant\n")
    assert render_prompt(msgs, tok, DataConfig()) == exp


def test_fit_length():
    assert fit_length([1, 2, 3], [X, 2, 3], 2, "truncate") == ([1, 2], [X, 2], True)
    with pytest.raises(BadRow, match="too long"):
        fit_length([1, 2, 3], [X, 2, 3], 2, "drop")
    with pytest.raises(BadRow, match="no trained tokens after truncation"):
        fit_length([1, 2, 3], [X, X, 3], 2, "truncate")


text_st = st.text(alphabet=st.characters(blacklist_characters="<", blacklist_categories=("Cs", "Cc")),
                  min_size=1, max_size=12).filter(lambda s: s.strip())


@st.composite
def conversations(draw):
    n = draw(st.integers(1, 4))
    msgs = []
    for _ in range(n):
        msgs.append({"role": "user", "content": draw(text_st)})
        if draw(st.booleans()):
            msgs.append({"role": "tool", "content": draw(text_st)})
        msgs.append({"role": "assistant", "content": draw(text_st)})
    system = draw(st.one_of(st.none(), text_st))
    return Conversation(messages=msgs, system=system)


@functools.lru_cache(None)
def _chatml_renderer(tok):
    return Renderer(tok)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conv=conversations())
def test_property_trained_labels_are_exactly_assistant_spans(tok, conv):
    ids, labels = _chatml_renderer(tok).tokenize(conv)
    assert len(ids) == len(labels) and labels[0] == IGNORE
    assert all(l in (IGNORE, i) for i, l in zip(ids, labels))
    expected = [t for m in conv.messages if m["role"] == "assistant" for t in B(m["content"]) + [IM_END]]
    assert [l for l in labels if l != IGNORE] == expected
    # and they sit right after each "<|im_start|>assistant\n" header
    header = [IM_START] + B("assistant\n")
    starts = [i + len(header) for i in range(len(ids)) if ids[i:i + len(header)] == header]
    trained_runs_start = [i for i in range(1, len(labels)) if labels[i] != IGNORE and labels[i - 1] == IGNORE]
    assert starts == trained_runs_start


@functools.lru_cache(None)
def _llama2_renderer():
    return Renderer(_family(LLAMA2, bos_token="<s>", eos_token="</s>"))


@settings(max_examples=30, deadline=None)
@given(conv=conversations())
def test_property_llama2_template(conv):
    conv = Conversation(messages=[m for m in conv.messages if m["role"] != "tool"])
    r = _llama2_renderer()
    tk = r.tokenizer
    ids, labels = r.tokenize(conv)
    expected = [t for m in conv.messages if m["role"] == "assistant"
                for t in B(" " + m["content"].strip() + " ") + [tk.eos_token_id]]
    assert [l for l in labels if l != IGNORE] == expected
