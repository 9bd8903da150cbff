"""PEFT adapters on disk (finetune.models.adapters): a saved adapter loads with plain peft and with
`load_for_inference`, a merged dir loads as a model, and an adapter is refused on a base it does
not fit, in one line."""

import json
import shutil

import pytest
import torch

from finetune.errors import UsageError
from finetune.models import load as fm
from finetune.models.adapters import load_for_inference
from tiny_peft import logits, lora_cfg


def randomize_lora_b(model, seed=1):
    """Fresh LoRA B is zero (adapter = identity); make it non-trivial so comparisons mean something."""
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture
def adapter_dir(tmp_path, tiny_model):
    torch.manual_seed(0)
    model = fm.load_model(lora_cfg(), "cpu")
    randomize_lora_b(model)
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    return out, logits(model)


def test_adapter_loads_with_plain_peft(adapter_dir, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, expected = adapter_dir
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"]), out)
    assert torch.equal(logits(plain), expected)

    model, tok = load_for_inference(str(out))
    assert torch.equal(logits(model), expected)
    assert not model.training and tok.padding_side == "left" and tok.pad_token_id != tok.eos_token_id


def test_load_for_inference_merged_dir(adapter_dir, tmp_path):
    out, expected = adapter_dir
    model, tok = load_for_inference(str(out))
    merged = tmp_path / "merged"
    model.merge_and_unload().save_pretrained(merged)
    tok.save_pretrained(merged)
    m2, tok2 = load_for_inference(str(merged))
    assert type(m2).__name__ == "LlamaForCausalLM"
    assert torch.allclose(logits(m2), expected, atol=1e-5)
    base, _ = load_for_inference("tiny")
    assert not torch.allclose(logits(base), expected, atol=1e-3)


def test_adapter_on_wrong_base_is_refused(adapter_dir, tmp_path):
    from finetune.models.tiny import make_tiny_model

    out, _ = adapter_dir
    other = make_tiny_model(tmp_path / "other", hidden_size=32, intermediate_size=64)
    with pytest.raises(UsageError, match=r"does not fit base .*: model\.layers\.0\.\w+\.\w+ has (input|output) size \d+ in the base, \d+ in the adapter$"):
        load_for_inference(str(out), base=str(other))

    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    cfg_file = moved / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = str(other)
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="does not fit base"):
        load_for_inference(str(moved))
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="its base model: model path not found"):
        load_for_inference(str(moved))


def test_load_for_inference_bad_paths(tmp_path):
    with pytest.raises(UsageError, match="model path not found"):
        load_for_inference(str(tmp_path / "nope"))
    (tmp_path / "junk").mkdir()
    with pytest.raises(UsageError, match="neither a LoRA adapter"):
        load_for_inference(str(tmp_path / "junk"))
