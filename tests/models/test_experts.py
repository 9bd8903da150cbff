"""NF4 fused MoE experts and LoRA on them (lora.target_parameters) through load_model, on the CPU."""

import pytest
import torch
from tiny_peft import make_cfg

from finetune.models.experts import NF4Stored
from finetune.models.load import load_model
from finetune.moe.build import build_moe
from finetune.moe.spec import parse_moe_config

EXPERT_PARAMS = "[mlp.experts.gate_up_proj,mlp.experts.down_proj]"


@pytest.fixture(scope="module")
def tiny_moe(tiny_model, tmp_path_factory):
    spec = parse_moe_config({"base_model": str(tiny_model), "gate_mode": "random",
                             "experts": [{"source_model": str(tiny_model)}] * 3})
    return build_moe(spec, str(tmp_path_factory.mktemp("moe") / "moe"))


def moe_cfg(path, **kw):
    return make_cfg(**{"model.name": str(path), "lora.target_modules": "[]", "lora.target_parameters": EXPERT_PARAMS,
                       "lora.modules_to_save": "[gate]", **kw})


def test_nf4_experts_train_expert_lora_and_router(tiny_moe, tmp_path):
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = load_model(moe_cfg(tiny_moe, **{"quant.mode": "nf4"}), "cpu", gradient_checkpointing=False)
    nf4 = [m for m in model.modules() if isinstance(m, NF4Stored)]
    assert len(nf4) == 2 * 2 and all(m.packed.dtype == torch.uint8 for m in nf4)  # 2 layers x 2 stacks
    # no full-size expert weight is a parameter any more
    assert all(p.numel() == 0 for n, p in model.named_parameters() if n.endswith(".original"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("experts" in n and "lora_A" in n for n in trainable)
    assert any("mlp.gate.modules_to_save" in n for n in trainable)
    assert not any("q_proj" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ids = torch.randint(3, 200, (2, 12))
    for _ in range(2):  # the per-forward LoRA proxy is removed each time (no pile-up over NF4Stored)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    for m in model.modules():
        if type(m).__name__ == "ParamWrapper":
            base = m.get_base_layer()
            assert len(base.parametrizations[m.parameter_name]) == 1
    grads = [p.grad for n, p in model.named_parameters() if "experts" in n and "lora" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)

    # the adapter loads on the unquantized MoE with plain peft and reproduces the NF4 model closely
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path / "adapter")
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32),
                                      str(tmp_path / "adapter")).eval()
    model.eval()
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, plain(input_ids=ids).logits
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.98


def test_expert_lora_without_quantization(tiny_moe):
    torch.manual_seed(0)
    model = load_model(moe_cfg(tiny_moe), "cpu", gradient_checkpointing=False)
    assert not any(isinstance(m, NF4Stored) for m in model.modules())
    ids = torch.randint(3, 200, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "experts" in n and "lora_A" in n)
