"""finetune.eval.chat: piped lines answered once each, /reset and /exit, an adapter trained on an
NF4 base loaded on an NF4 base, the saved system prompt used."""

import io

import pytest
import torch
from tiny_peft import random_lora_adapter

from finetune.config import Config, to_yaml
from finetune.eval.chat import Sampling, chat, chat_data_config
from finetune.models.trained import load_as_trained

GREEDY = Sampling(max_new_tokens=6, temperature=0.0)


def _run(path, text, **kw):
    out = io.StringIO()
    answers = chat(str(path), stdin=io.StringIO(text), stdout=out, device="cpu", sampling=GREEDY, **kw)
    return answers, out.getvalue()


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    return random_lora_adapter(tmp_path_factory.mktemp("chat") / "a", tiny_model, seed=5, scale=0.2)


def _record_run(adapter_dir, **data):
    cfg = Config()
    cfg.model.name = "tiny"
    cfg.quant.mode = data.pop("quant", "none")
    for k, v in data.items():
        setattr(cfg.data, k, v)
    (adapter_dir / "config.yaml").write_text(to_yaml(cfg))


def test_piped_lines_answered_once_reset_and_exit(adapter):
    answers, out = _run(adapter, "hello\n\nhello again\n/reset\nhello\n/exit\nnever answered\n")
    assert len(answers) == 3  # blank line skipped, nothing after /exit
    assert answers[2] == answers[0]  # after /reset the same prompt gets the same greedy answer
    assert "(conversation reset)" in out and "> " not in out  # no prompt marker when piped
    assert all(a in out for a in answers)  # streamed to stdout


def test_model_dir_and_end_of_input(tiny_model):
    answers, _ = _run(tiny_model, "one\ntwo")  # last line without newline, then end of input
    assert len(answers) == 2


def test_saved_system_prompt_is_used_unless_replaced(adapter, tmp_path):
    d = tmp_path / "sys"
    d.mkdir()
    for f in adapter.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    _record_run(d, system_prompt="You are Quess.")
    assert chat_data_config(str(d), None).system_prompt == "You are Quess."
    assert chat_data_config(str(d), "").system_prompt is None
    assert chat_data_config(str(d), "Other.").system_prompt == "Other."


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_adapter_trained_on_nf4_loads_on_nf4(adapter, tmp_path, monkeypatch, precision):
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("FINETUNE_CPU_PRECISION", precision)
    d = tmp_path / "q"
    d.mkdir()
    for f in adapter.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    _record_run(d, quant="nf4")
    import bitsandbytes as bnb

    model, _ = load_as_trained(str(d), "cpu", torch.float32)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    answers, _ = _run(d, "hi\n")
    assert len(answers) == 1
