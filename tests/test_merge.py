"""Merge one adapter into its base (logit parity by dtype) and combine adapters via peft."""

import json

import pytest
import torch
from tiny_peft import random_lora_adapter

from finetune.errors import UsageError
from finetune.merge import combine_adapters, merge_adapter
from finetune.models.tiny import make_tiny_model

IDS = torch.tensor([[1, 75, 108, 3 + ord("h"), 3 + ord("i"), 2, 40, 50]])


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": random_lora_adapter(root / "a", tiny_model, seed=1, r=4),
        "b": random_lora_adapter(root / "b", tiny_model, seed=2, r=4),
        "r8": random_lora_adapter(root / "r8", tiny_model, seed=3, r=8),
        "qv": random_lora_adapter(root / "qv", tiny_model, seed=4, r=4, target_modules=["q_proj", "v_proj"]),
    }


def peft_logits(base_dir, adapter_dir, ids=IDS):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(ids).logits


def plain_logits(path, ids=IDS, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("dtype,atol", [("fp32", 1e-5), ("bf16", 3e-2), ("fp16", 3e-3)])
def test_merged_logits_equal_peft(tiny_model, adapters, tmp_path, dtype, atol):
    out = merge_adapter(str(adapters["a"]), str(tmp_path / "m"), dtype=dtype)
    ref = peft_logits(tiny_model, adapters["a"])
    # Low-precision checkpoints are upcast to fp32 for the forward: the test measures the
    # rounding of the stored weights, not CPU bf16 arithmetic.
    got = plain_logits(out, dtype=torch.float32)
    assert (got - ref).abs().max().item() < atol
    assert not torch.allclose(ref, plain_logits(tiny_model), atol=1e-4)  # the adapter does something
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["dtype"] == {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert list(out.glob("*.safetensors"))
    assert not list(out.parent.glob(".m.tmp-*"))  # temp dir renamed away


def test_merge_sharded_and_tokenizer_from_adapter(adapters, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = "{{ 'ADAPTER TEMPLATE' }}"
    tok.save_pretrained(adapters["b"])
    out = merge_adapter(str(adapters["b"]), str(tmp_path / "m"), dtype="fp32", max_shard_size="50KB")
    assert (out / "model.safetensors.index.json").is_file()
    assert AutoTokenizer.from_pretrained(out).chat_template == "{{ 'ADAPTER TEMPLATE' }}"
    assert torch.allclose(plain_logits(out), peft_logits(tiny_model, adapters["b"]), atol=1e-5)


@pytest.mark.parametrize("method,density", [("linear", None), ("cat", None), ("svd", None), ("ties", 0.5),
                                            ("dare_linear", 0.7), ("magnitude_prune", 0.5)])
def test_combine_methods_load_with_peft(tiny_model, adapters, tmp_path, method, density):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = combine_adapters([str(adapters["a"]), str(adapters["b"])], str(tmp_path / "c"),
                           weights=[0.6, 0.4], method=method, density=density)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        logits = model(IDS).logits
    assert torch.isfinite(logits).all()
    assert cfg["r"] == (8 if method == "cat" else 4)


def test_combine_cat_equals_weighted_sum_of_deltas(tiny_model, adapters, tmp_path):
    """cat is exact: the combined delta is w_a * delta_a + w_b * delta_b."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = combine_adapters([str(adapters["a"]), str(adapters["b"])], str(tmp_path / "c"),
                           weights=[1.0, 1.0], method="cat")

    def delta(adapter):
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        w0 = base.model.layers[0].mlp.down_proj.weight.detach().clone()
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        return merged.model.layers[0].mlp.down_proj.weight.detach() - w0

    assert torch.allclose(delta(out), delta(adapters["a"]) + delta(adapters["b"]), atol=1e-6)


def test_combine_refusals(tiny_model, adapters, tmp_path):
    a, b, r8, qv = (str(adapters[k]) for k in ("a", "b", "r8", "qv"))
    with pytest.raises(UsageError, match=r"equal LoRA ranks, got r=4 .*r=8"):
        combine_adapters([a, r8], str(tmp_path / "x"), method="ties", density=0.5)
    combine_adapters([a, r8], str(tmp_path / "ok"), method="cat")  # cat accepts different ranks
    with pytest.raises(UsageError, match="different modules"):
        combine_adapters([a, qv], str(tmp_path / "x"), method="cat")
    with pytest.raises(UsageError, match="needs density"):
        combine_adapters([a, b], str(tmp_path / "x"), method="dare_ties")
    with pytest.raises(UsageError, match="at least 2"):
        combine_adapters([a], str(tmp_path / "x"))
    with pytest.raises(UsageError, match="weights has 3"):
        combine_adapters([a, b], str(tmp_path / "x"), weights=[1, 1, 1])
    other = make_tiny_model(tmp_path / "other-base", seed=5)
    c = random_lora_adapter(tmp_path / "c", other, seed=1)
    with pytest.raises(UsageError, match="different base models"):
        combine_adapters([a, str(c)], str(tmp_path / "x"), method="cat")
    assert not (tmp_path / "x").exists()
