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


def test_stacks_are_packed_onto_the_device_one_at_a_time(tiny_moe, monkeypatch):
    """With a device, each stack is moved there alone and packed before the next one moves: a spy
    on the staging step and the packing step counts the unpacked stacks staged at any time."""
    pytest.importorskip("bitsandbytes")
    from torch.nn.utils import parametrize
    from transformers import AutoModelForCausalLM

    from finetune.models import experts

    staged, unpacked_at_pack, unpacked_at_stage = [], [], []
    live = lambda: sum(not parametrize.is_parametrized(m, p) for m, p in staged)  # noqa: E731
    real_stage, real_pack = experts._stage, NF4Stored.right_inverse

    def stage(m, p, device):
        unpacked_at_stage.append(live())
        staged.append((m, p))
        real_stage(m, p, device)

    def pack(self, w):
        unpacked_at_pack.append(live())
        return real_pack(self, w)

    monkeypatch.setattr(experts, "_stage", stage)
    monkeypatch.setattr(NF4Stored, "right_inverse", pack)
    model = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32)
    assert experts.quantize_fused_experts(model, torch.float32, device=torch.device("cpu")) == 4
    assert unpacked_at_stage == [0, 0, 0, 0] and unpacked_at_pack == [1, 1, 1, 1] and live() == 0

    monkeypatch.undo()  # without a device: the same codes, bit for bit
    plain = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32)
    experts.quantize_fused_experts(plain, torch.float32)
    a = {n: b for n, b in model.named_buffers() if n.endswith(".packed")}
    b = {n: b for n, b in plain.named_buffers() if n.endswith(".packed")}
    assert len(a) == 4 and a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_staged_load_is_todays_model_bit_for_bit(tiny_moe, monkeypatch):
    """The MoE+NF4 load for a GPU (whole model on the CPU, experts packed onto the device one by
    one, the rest moved after) run with the CPU as the device gives the same model as a direct load."""
    pytest.importorskip("bitsandbytes")
    from finetune.models import load

    cfg = moe_cfg(tiny_moe, **{"quant.mode": "nf4"})
    torch.manual_seed(0)
    direct = load_model(cfg, "cpu", gradient_checkpointing=False).state_dict()
    monkeypatch.setattr(load, "_experts_staged", lambda path, kw, device: True)
    torch.manual_seed(0)
    model = load_model(cfg, "cpu", gradient_checkpointing=False)
    staged = model.state_dict()
    assert sum(isinstance(m, NF4Stored) for m in model.modules()) == 4
    assert staged.keys() == direct.keys()
    assert all(torch.equal(staged[k], direct[k]) for k in direct)


class _Loaded(Exception):
    pass


@pytest.mark.parametrize("moe, nf4_experts, where", [(True, True, "cpu"), (True, False, 0), (False, True, 0)])
def test_a_moe_for_a_gpu_loads_on_the_cpu(tiny_moe, tiny_model, monkeypatch, moe, nf4_experts, where):
    """Only a MoE whose experts are packed to NF4 loads through the CPU; everything else straight
    onto the device (the GPU is mocked: from_pretrained records where it was asked to load)."""
    from transformers import BitsAndBytesConfig

    from finetune.models import load

    asked = {}

    def from_pretrained(path, **kw):
        asked.update(kw)
        raise _Loaded

    monkeypatch.setattr(load.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    with pytest.raises(_Loaded):
        load.load_pretrained(str(tiny_moe if moe else tiny_model), dtype=torch.bfloat16,
                             device=torch.device("cuda", 0), quant=quant, nf4_experts=nf4_experts)
    assert asked["device_map"] == {"": where}
