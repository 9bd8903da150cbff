"""Router training (issue 7 section 4): recipes/moe-router.yaml on a tiny MoE, through finetune.train.

The MoE is built from two random LoRA experts on the tiny Llama; the router (each layer's
mlp.gate, a MixtralTopKRouter) trains in full via peft modules_to_save. The transformers
double-softmax finding itself (huggingface/transformers#45120) is tested in tests/moe/test_build.py.
"""

import json

import pytest
import torch
from tiny_peft import random_lora_adapter

from finetune.config import load_config
from finetune.moe.build import build_moe
from finetune.moe.routing import load_balancing_loss
from finetune.moe.spec import parse_moe_config

E, K = 3, 2
IDS = torch.tensor([[1, 75, 108, 3 + ord("h"), 3 + ord("i"), 2, 40, 50, 60, 70, 80, 90]])


@pytest.fixture(scope="module")
def moe_dir(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-router")
    experts = [{"adapter": str(random_lora_adapter(root / f"e{i}", tiny_model, seed=i + 1, scale=0.2))}
               for i in range(E)]
    spec = parse_moe_config({"base_model": str(tiny_model), "experts": experts, "gate_mode": "random",
                             "experts_per_token": K, "seed": 3})
    return build_moe(spec, str(root / "moe"))


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    f = tmp_path_factory.mktemp("router-data") / "train.jsonl"
    qa = [("capital of Ostravel?", "Brennholt"), ("5 km in m?", "=> 5000 m"), ("Great kettle. Verdict?", "KEEP"),
          ("river of Ostravel?", "the Sallow"), ("70 mm in cm?", "=> 7 cm"), ("Broke in a day. Verdict?", "RETURN")]
    with f.open("w") as fh:
        for q, a in qa * 3:
            fh.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    return f


def train_router(moe_dir, rows, out_dir, **overrides):
    from finetune.training.loop import main, make_fabric

    over = {"model.name": str(moe_dir), "data.card": "null", "data.path": str(rows), "data.format": "messages",
            "data.seq_len": "64", "train.max_steps": "3", "train.micro_batch_size": "2",
            "train.global_batch_size": "2", "train.lr": "0.01", "train.warmup_steps": "0",
            "train.save_every": "0", "lora.r": "2", "lora.alpha": "4",
            "out_dir": str(out_dir), "output.progress": "false", "output.loggers": "[]"}
    over.update({k: str(v) for k, v in overrides.items()})
    cfg = load_config("moe-router", over)
    return main(make_fabric(cfg), cfg)


def saved_gates(adapter_dir) -> dict:
    from safetensors.torch import load_file

    sd = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return {k: v for k, v in sd.items() if k.endswith("mlp.gate.weight")}


def moe_gates(moe_dir) -> list:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)
    return [layer.mlp.gate.weight.detach().clone() for layer in m.model.layers]


@pytest.fixture(scope="module")
def trained(moe_dir, rows, tmp_path_factory):
    root = tmp_path_factory.mktemp("router-runs")
    return {c: train_router(moe_dir, rows, root / f"coef{c}", **{"train.router_aux_loss_coef": c})
            for c in (0.0, 0.5)}


def test_router_trains_and_is_saved_in_the_adapter(moe_dir, trained):
    before = moe_gates(moe_dir)
    gates = saved_gates(trained[0.5].final_dir)
    assert sorted(gates) == [f"base_model.model.model.layers.{i}.mlp.gate.weight" for i in range(len(before))]
    for i, w in enumerate(before):
        after = gates[f"base_model.model.model.layers.{i}.mlp.gate.weight"]
        assert after.shape == (E, w.shape[1])
        assert not torch.allclose(after, w), f"layer {i} router did not change"
    # the experts' own weights stay frozen: only the recipe's LoRA on them trains
    model = trained[0.5].model
    expert_params = {n: p for n, p in model.named_parameters() if ".experts." in n}
    assert expert_params and any("lora_" in n and p.requires_grad for n, p in expert_params.items())
    assert not any(p.requires_grad for n, p in expert_params.items() if "lora_" not in n)
    assert not any(".experts." in k for k in saved_gates(trained[0.5].final_dir))


def test_aux_loss_changes_training(trained):
    a, b = saved_gates(trained[0.0].final_dir), saved_gates(trained[0.5].final_dir)
    assert any(not torch.allclose(a[k], b[k]) for k in a)


def test_adapter_reloads_on_the_moe(moe_dir, trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.models.adapters import load_for_inference

    final = trained[0.5].final_dir
    ref = trained[0.5].model.eval()
    with torch.no_grad():
        want = ref(input_ids=IDS, use_cache=False).logits
    base = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)
    got_model = PeftModel.from_pretrained(base, str(final)).eval()
    with torch.no_grad():
        got = got_model(input_ids=IDS, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    gate = got_model.base_model.model.model.layers[0].mlp.gate
    torch.testing.assert_close(gate.modules_to_save["default"].weight.detach(),
                               saved_gates(final)["base_model.model.model.layers.0.mlp.gate.weight"])
    model, _ = load_for_inference(str(final))  # what `finetune eval models=[...]` does
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS, use_cache=False).logits, want, rtol=1e-5, atol=1e-5)


def test_expert_lora_adapter_loads_for_eval(moe_dir, rows, tmp_path):
    """Router + LoRA on both fused expert tensors (the experts-lora variant of docs/moe.md): peft
    nests one wrapper per target parameter, so the inner one's keys read `mlp.experts.base_layer.lora_A`;
    the fit check `finetune eval` runs must accept them, and the reload gives the trained logits."""
    from safetensors import safe_open

    from finetune.models.adapters import load_for_inference

    res = train_router(moe_dir, rows, tmp_path / "xl", **{
        "lora.target_parameters": "[mlp.experts.gate_up_proj,mlp.experts.down_proj]"})
    with safe_open(str(res.final_dir / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(".mlp.experts.base_layer.lora_A." in k for k in keys)
    assert any(".mlp.experts.lora_A." in k for k in keys)
    with torch.no_grad():
        want = res.model.eval()(input_ids=IDS, use_cache=False).logits
        model, _ = load_for_inference(str(res.final_dir))
        torch.testing.assert_close(model(input_ids=IDS, use_cache=False).logits, want, rtol=1e-5, atol=1e-5)


def _hand_aux(model, ids):
    """Switch loss from the router's own inputs: p = softmax(h W^T) by hand, f = top-k share."""
    inputs = []
    routers = [m for m in model.modules() if type(m).__name__ == "MixtralTopKRouter"]
    hooks = [r.register_forward_hook(lambda mod, args, out: inputs.append((args[0].detach(), mod))) for r in routers]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    probs = torch.cat([torch.softmax(x.reshape(-1, x.shape[-1]) @ mod.weight.detach().T, dim=-1) for x, mod in inputs])
    T = probs.shape[0]
    total = 0.0
    for e in range(E):
        f = sum(1.0 for t in range(T) if e in torch.topk(probs[t], K).indices.tolist()) / T
        total += f * probs[:, e].mean().item()
    return E * total


@pytest.mark.parametrize("chunk", [0, 4])
def test_aux_term_is_the_hand_computed_switch_loss(moe_dir, chunk):
    from transformers import AutoModelForCausalLM
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from finetune.training.objectives.sft import CausalLMLoss

    model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    labels = IDS.clone()
    labels[:, :4] = -100
    pos = torch.arange(IDS.shape[1])[None]
    coef = 0.3
    with torch.no_grad():
        plain, n = CausalLMLoss(model, chunk=chunk)(IDS, labels, pos)
        with_aux, n2 = CausalLMLoss(model, chunk=chunk, router_aux_coef=coef)(IDS, labels, pos)
        router_out = model(input_ids=IDS, use_cache=False, output_router_logits=True)
    assert n == n2 == (labels[:, 1:] != -100).sum()
    hand = _hand_aux(model, IDS)
    added = ((with_aux - plain) / (coef * n)).item()
    assert added == pytest.approx(hand, rel=1e-5)
    assert load_balancing_loss(router_out.router_logits, E, K).item() == pytest.approx(hand, rel=1e-5)
    # ... and not transformers' aux_loss (probabilities softmaxed twice), which the loop never reads
    hf = load_balancing_loss_func(router_out.router_logits, E, K).item()
    assert router_out.aux_loss.item() == pytest.approx(hf)
    assert added != pytest.approx(hf, rel=1e-3)


@pytest.mark.parametrize("probe", ["bf16", "fp32"])
def test_router_trains_at_the_default_precision(moe_dir, rows, tmp_path, monkeypatch, probe):
    """precision=auto on a bf16-capable CPU keeps the frozen MoE in bf16 while the router copy
    trains in fp32: it once failed with "BFloat16 != float" in the router's linear."""
    monkeypatch.setenv("FINETUNE_CPU_PRECISION", probe)
    result = train_router(moe_dir, rows, tmp_path / "run", **{"train.router_aux_loss_coef": 0.01})
    assert result.final_dir.is_dir()
    gate = result.model.base_model.model.model.layers[0].mlp.gate.modules_to_save["default"].weight
    assert gate.dtype == torch.float32 and gate.requires_grad
    frozen = result.model.base_model.model.model.layers[0].self_attn.o_proj.weight
    assert frozen.dtype == (torch.bfloat16 if probe == "bf16" else torch.float32)
