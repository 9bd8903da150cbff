"""Prompt styles byte for byte, multi-turn as one conversation, boundary tokens, custom chat
templates (saved with the tokenizer) and cache keys that follow the template and the code."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import IM_END, B, merging_tokenizer, seen

from finetune.config import DataConfig
from finetune.data import pipeline
from finetune.data.formats import Conversation, columns_for, to_conversation
from finetune.data.pipeline import get_renderer, prepare
from finetune.data.tokenize import Renderer
from finetune.errors import UsageError

NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
            "the request.\n\n")
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n")


def alpaca(tok, row, **kw):
    return seen(Renderer(tok, prompt_style="alpaca", **kw), to_conversation(row, "alpaca", columns_for("alpaca")))


def test_stanford_alpaca_template_with_and_without_input(tok):
    out = alpaca(tok, {"instruction": "Add", "input": "1 and 2", "output": "3"})
    assert out["text"] == WITH_INPUT + "### Instruction:\nAdd\n\n### Input:\n1 and 2\n\n### Response:\n3<|im_end|>"
    assert out["trained"] == ["3<|im_end|>"]
    out = alpaca(tok, {"instruction": "Add", "input": "", "output": "3"})
    assert out["text"] == NO_INPUT + "### Instruction:\nAdd\n\n### Response:\n3<|im_end|>"


def test_alpaca_multi_turn_is_one_conversation_preamble_once(tok):
    out = alpaca(tok, {"instruction": "Add", "input": "", "output": "3", "history": [["Hi", "Hello"]]})
    assert out["text"] == (NO_INPUT + "### Instruction:\nHi\n\n### Response:\nHello<|im_end|>\n\n"
                           "### Instruction:\nAdd\n\n### Response:\n3<|im_end|>")
    assert out["trained"] == ["Hello<|im_end|>", "3<|im_end|>"]
    out = alpaca(tok, {"instruction": "Add", "output": "3", "system": "Be brief."})
    assert out["text"] == "Be brief.\n\n### Instruction:\nAdd\n\n### Response:\n3<|im_end|>"


def test_alpaca_prompt_is_what_training_rendered(tok):
    from finetune.data.pipeline import render_prompt

    conv = to_conversation({"instruction": "Add", "input": "1 and 2", "output": "3"}, "alpaca", columns_for("alpaca"))
    ids = render_prompt(conv, tok, DataConfig(prompt_style="alpaca"))
    assert tok.decode(ids) == WITH_INPUT + "### Instruction:\nAdd\n\n### Input:\n1 and 2\n\n### Response:\n"


@pytest.mark.slow  # imports all of litgpt (~10 s)
def test_llama3_style_multi_turn_says_bos_and_system_once():
    from finetune.models.tiny import byte_tokenizer

    tk = byte_tokenizer()
    tk.chat_template = None
    tk.add_special_tokens({"bos_token": "<|begin_of_text|>",
                           "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    conv = Conversation(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                  {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}])
    out = seen(Renderer(tk, prompt_style="llama3"), conv)
    h = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"  # noqa: E731
    assert out["text"] == ("<|begin_of_text|>" + h("system") + "You are a helpful assistant.<|eot_id|>"
                           + h("user") + "a<|eot_id|>" + h("assistant") + "b<|eot_id|>"
                           + h("user") + "c<|eot_id|>" + h("assistant") + "d<|eot_id|>")
    assert out["trained"] == ["b<|eot_id|>", "d<|eot_id|>"]


def test_no_prompt_character_is_trained_at_a_merged_boundary():
    tk = merging_tokenizer()
    conv = Conversation(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": " a"}])
    ids, labels = Renderer(tk).tokenize(conv)
    header_end = ids.index(259)  # "\n " is one token: the header's newline and the answer's space
    assert labels[header_end] == -100
    assert [t for t in labels if t != -100] == B("a") + [IM_END]


# ---------------------------------------------------------------------------- custom chat templates

BRACKETS = ("{% for m in messages %}{{ '[' + m['role'] + ']' + m['content'] + '<|im_end|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '[assistant]' }}{% endif %}")
QA = Conversation(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])


def fresh_tok(template="keep"):
    from finetune.models.tiny import byte_tokenizer

    tk = byte_tokenizer()
    if template != "keep":
        tk.chat_template = template
    return tk


def test_chat_template_file_overrides_and_is_saved_with_the_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    f = tmp_path / "brackets.jinja"
    f.write_text(BRACKETS)
    tk = fresh_tok()
    r = get_renderer(tk, DataConfig(chat_template=str(f)))
    assert seen(r, QA)["text"] == "[user]q<|im_end|>[assistant]a<|im_end|>"
    tk.save_pretrained(tmp_path / "adapter")
    assert AutoTokenizer.from_pretrained(tmp_path / "adapter").chat_template == BRACKETS


def test_chat_template_names_and_errors(tmp_path):
    tk = fresh_tok(None)
    r = get_renderer(tk, DataConfig(chat_template="chatml"))
    assert seen(r, QA)["text"] == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
    tk = fresh_tok({"default": BRACKETS, "tool_use": BRACKETS.replace("'['", "'('")})
    assert seen(get_renderer(tk, DataConfig(chat_template="tool_use")), QA)["text"].startswith("(user]q")
    with pytest.raises(UsageError, match="neither a file nor a named template"):
        get_renderer(fresh_tok(), DataConfig(chat_template="chatlm"))
    with pytest.raises(UsageError, match="set only one"):
        get_renderer(fresh_tok(), DataConfig(chat_template="chatml", prompt_style="alpaca"))
    with pytest.raises(UsageError, match="not a valid jinja template"):
        get_renderer(fresh_tok(), DataConfig(chat_template="{% for %}"))


# ---------------------------------------------------------------------------- cache keys

def data_cfg(tmp_path, **kw):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"instruction": f"i{k}", "output": f"o{k}"} for k in range(4)]))
    return DataConfig(path=str(p), format="alpaca", val_fraction=0.0, seq_len=128, **kw)


def trained(bundle) -> list[str]:
    from finetune.data.dump import record, unpacked

    return sorted(s for ids, labels in unpacked(bundle.train) for s in record(fresh_tok(), ids, labels)["trained"])


def test_cache_follows_a_template_changed_in_process(tmp_path):
    cfg = data_cfg(tmp_path)
    tk = fresh_tok()
    first = prepare(cfg, tk, seed=0, progress=False)
    tk.chat_template = BRACKETS  # same tokenizer object, new template
    second = prepare(cfg, tk, seed=0, progress=False)
    assert not second.stats.cached
    assert first.train.ids.tolist() != second.train.ids.tolist()
    assert "[assistant]" in fresh_tok().decode(second.train.ids.tolist())
    assert prepare(cfg, tk, seed=0, progress=False).stats.cached


def test_cache_across_processes_holds_the_template_used(tmp_path):
    cfg = data_cfg(tmp_path)
    tk = fresh_tok()
    prepare(cfg, tk, seed=0, progress=False)
    tk.chat_template = BRACKETS
    here = prepare(cfg, tk, seed=0, progress=False)
    code = ("import json, sys; from finetune.config import DataConfig; from finetune.data.pipeline import prepare;"
            "from finetune.models.tiny import byte_tokenizer; tk = byte_tokenizer(); tk.chat_template = sys.argv[1];"
            "b = prepare(DataConfig(**json.loads(sys.argv[2])), tk, seed=0, progress=False);"
            "print(json.dumps([b.stats.cached, b.train.ids.tolist()]))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", code, BRACKETS, json.dumps(vars(cfg))], env=env,
                         capture_output=True, text=True, check=True).stdout
    cached, ids = json.loads(out.splitlines()[-1])
    assert cached and ids == here.train.ids.tolist()


def test_cache_key_follows_the_data_code(tmp_path, monkeypatch):
    cfg, tk = data_cfg(tmp_path), fresh_tok()
    before = pipeline.cache_key(cfg, tk, 0)
    monkeypatch.setattr(pipeline, "code_fingerprint", lambda: "changed data code")
    assert pipeline.cache_key(cfg, tk, 0) != before
    monkeypatch.undo()  # the real fingerprint: a hash of the package's own data code
    assert len(pipeline.code_fingerprint()) == 64 and "styles.py" in pipeline.CODE_FILES
