"""Mixtral MoE assembly from tiny Llama fine-tunes: parity, gate init, refusals, routing, aux loss."""

import json
import logging

import pytest
import torch
from tiny_peft import random_lora_adapter

from finetune.errors import UsageError
from finetune.models.tiny import make_tiny_model
from finetune.models.tiny_spec import BYTE_OFFSET
from finetune.moe.build import build_moe
from finetune.moe.routing import (
    load_balancing_loss,
    router_probs,
    router_trainable_params,
)
from finetune.moe.spec import parse_moe_config

IDS = torch.tensor([[1, 75, 108, 3 + ord("h"), 3 + ord("i"), 2, 40, 50, 60, 70]])


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-adapters")
    return {
        "a": random_lora_adapter(root / "a", tiny_model, seed=1, scale=0.1),
        "b": random_lora_adapter(root / "b", tiny_model, seed=2, scale=0.1),
        "attn": random_lora_adapter(root / "attn", tiny_model, seed=3, target_modules=["q_proj", "v_proj"]),
    }


def logits(path_or_model, ids=IDS):
    from transformers import AutoModelForCausalLM

    model = path_or_model
    if not isinstance(model, torch.nn.Module):
        model = AutoModelForCausalLM.from_pretrained(path_or_model, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(ids).logits


def spec(base, experts, **kw):
    return parse_moe_config({"base_model": str(base), "experts": experts, **kw})


@pytest.mark.parametrize("k,mode", [(1, "random"), (2, "uniform_random"), (3, "random")])
def test_experts_equal_to_base_reproduce_base(tiny_model, tmp_path, k, mode):
    # Mixtral renormalises the top-k weights to sum to 1, so identical experts give the base MLP.
    out = build_moe(spec(tiny_model, [{"source_model": str(tiny_model)}] * 3, gate_mode=mode,
                         experts_per_token=k), str(tmp_path / "moe"))
    assert torch.allclose(logits(out), logits(tiny_model), atol=1e-5)


def test_output_is_mixtral_and_generates(tiny_model, adapters, tmp_path):
    from safetensors import safe_open
    from transformers import AutoTokenizer, MixtralForCausalLM

    out = build_moe(spec(tiny_model, [{"adapter": str(adapters["a"])}, {"adapter": str(adapters["b"])}],
                         gate_mode="random", dtype="bfloat16"), str(tmp_path / "moe"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["model_type"] == "mixtral"
    assert cfg["num_local_experts"] == 2 and cfg["num_experts_per_tok"] == 2 and cfg["dtype"] == "bfloat16"
    model = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    gen = model.generate(**tok("Hi", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 6)
    with safe_open(out / "model.safetensors", "pt") as f:  # the classic on-disk Mixtral layout
        keys = set(f.keys())
    assert "model.layers.1.block_sparse_moe.experts.1.w3.weight" in keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys


def test_adapter_expert_mlp_is_merged_and_attention_is_base(tiny_model, adapters, tmp_path, caplog):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with caplog.at_level(logging.WARNING):
        out = build_moe(spec(tiny_model, [{"adapter": str(adapters["a"])}, {"source_model": str(tiny_model)}],
                             gate_mode="random"), str(tmp_path / "moe"))
    assert "dropped non-MLP deltas on k_proj, o_proj, q_proj, v_proj" in caplog.text
    info = json.loads((out / "moe_info.json").read_text())
    assert info["dropped_non_mlp_deltas"][str(adapters["a"])] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), str(adapters["a"])).merge_and_unload()
    for li in range(2):
        m, b, x = moe.model.layers[li], base.model.layers[li], merged.model.layers[li]
        gu = m.mlp.experts.gate_up_proj
        assert torch.equal(gu[0], torch.cat([x.mlp.gate_proj.weight, x.mlp.up_proj.weight]))
        assert torch.equal(m.mlp.experts.down_proj[0], x.mlp.down_proj.weight)
        assert torch.equal(gu[1], torch.cat([b.mlp.gate_proj.weight, b.mlp.up_proj.weight]))
        assert torch.equal(m.self_attn.q_proj.weight, b.self_attn.q_proj.weight)  # not the adapter's
        assert not torch.equal(x.self_attn.q_proj.weight, b.self_attn.q_proj.weight)


def test_attention_only_adapters_give_the_base(tiny_model, adapters, tmp_path):
    out = build_moe(spec(tiny_model, [{"adapter": str(adapters["attn"])}] * 2, gate_mode="random"),
                    str(tmp_path / "moe"))
    assert torch.allclose(logits(out), logits(tiny_model), atol=1e-5)


def _layer_inputs(model, ids):
    """Hand computation: what each decoder layer receives, captured with pre-hooks."""
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: seen.append(
        (kw.get("hidden_states") if a == () else a[0])[0, -1].clone()), with_kwargs=True)
             for layer in model.model.layers]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return torch.stack(seen)


def _ids(text):
    return [BYTE_OFFSET + b for b in text.encode()]  # the tiny tokenizer has no bos


def _gates(path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return torch.stack([layer.mlp.gate.weight.detach() for layer in m.model.layers])


def test_hidden_gates_match_hand_computation(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    experts = [{"source_model": str(tiny_model), "positive_prompts": ["write code", "def f():"],
                "negative_prompts": ["a poem"]},
               {"source_model": str(tiny_model), "positive_prompts": ["2+2=", "integral of x"]}]
    out = build_moe(spec(tiny_model, experts, gate_mode="hidden"), str(tmp_path / "moe"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    rows = []
    for e in experts:
        v = sum(_layer_inputs(base, _ids(p)) for p in e["positive_prompts"]) / len(e["positive_prompts"])
        if e.get("negative_prompts"):
            v = v - sum(_layer_inputs(base, _ids(p)) for p in e["negative_prompts"]) / len(e["negative_prompts"])
        rows.append(v / v.norm(dim=-1, keepdim=True))
    expected = torch.stack(rows, dim=1)  # (layers, experts, hidden)
    assert torch.allclose(_gates(out), expected, atol=1e-5)
    assert not torch.allclose(expected[0], expected[1])  # per-layer rows differ


def test_cheap_embed_gates_match_hand_computation(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    experts = [{"source_model": str(tiny_model), "positive_prompts": ["abc", "zz"], "negative_prompts": ["q"]},
               {"source_model": str(tiny_model), "positive_prompts": ["hello"]}]
    out = build_moe(spec(tiny_model, experts, gate_mode="cheap_embed"), str(tmp_path / "moe"))
    emb = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).model.embed_tokens.weight.detach()

    def unit(v):
        return v / v.norm()

    def summed(prompts):  # mergekit: sum over tokens and prompts, then normalise
        return unit(sum(emb[_ids(p)].sum(0) for p in prompts))

    row0 = unit(summed(["abc", "zz"]) - summed(["q"]))
    row1 = summed(["hello"])
    g = _gates(out)
    for layer in range(g.shape[0]):  # the same row in every layer
        assert torch.allclose(g[layer, 0], row0, atol=1e-6)
        assert torch.allclose(g[layer, 1], row1, atol=1e-6)


def test_parallel_gate_rows_warn(tiny_model, tmp_path, caplog):
    experts = [{"source_model": str(tiny_model), "positive_prompts": ["same prompt"]},
               {"source_model": str(tiny_model), "positive_prompts": ["same prompt!"]}]
    with caplog.at_level(logging.WARNING):
        out = build_moe(spec(tiny_model, experts, gate_mode="cheap_embed"), str(tmp_path / "moe"))
    assert "nearly parallel gate rows in all layers" in caplog.text
    assert json.loads((out / "moe_info.json").read_text())["gate_warnings"]


def test_noise_and_residual_scale(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    out = build_moe(spec(tiny_model, [{"source_model": str(tiny_model), "residual_scale": 0.5},
                                      {"source_model": str(tiny_model), "noise_scale": 0.01}],
                         gate_mode="random"), str(tmp_path / "moe"))
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    down = moe.model.layers[0].mlp.experts.down_proj
    assert torch.allclose(down[0], 0.5 * base.model.layers[0].mlp.down_proj.weight)
    diff = down[1] - base.model.layers[0].mlp.down_proj.weight
    assert 0.005 < diff.std().item() < 0.02


def test_refusals(tiny_model, adapters, tmp_path):
    src = {"source_model": str(tiny_model), "positive_prompts": ["x"]}
    cases = [
        ({"experts": [src]}, "at least 2 experts, got 1"),
        ({"experts": [src, src], "gate_mode": "hiden"}, "gate_mode must be one of hidden, hidden_avg, hidden_last, cheap_embed, random, uniform_random, got 'hiden'"),
        ({"experts": [src, {"source_model": str(tiny_model)}], "gate_mode": "hidden"},
         r"experts\[1\] .* has no positive_prompts"),
        ({"experts": [src, {"source_model": str(tiny_model)}], "gate_mode": "cheap_embed"}, "no positive_prompts"),
        ({"experts": [src, src], "experts_per_token": 3}, r"experts_per_token must be an integer in \[1, 2\]"),
        ({"experts": [src, {"source_model": "x", "adapter": "y"}]}, "exactly one of source_model or adapter"),
        ({"experts": [src, {**src, "positve_prompts": []}]}, "did you mean positive_prompts"),
        ({"experts": [src, src], "gate_mod": "random"}, "did you mean gate_mode"),
    ]
    for extra, msg in cases:
        with pytest.raises(UsageError, match=msg):
            parse_moe_config({"base_model": str(tiny_model), **extra})

    def build(experts, base=tiny_model):
        return build_moe(spec(base, experts, gate_mode="random"), str(tmp_path / "out"))

    wide = make_tiny_model(tmp_path / "wide", hidden_size=32, intermediate_size=64)
    with pytest.raises(UsageError, match="hidden_size=32, base has 64"):
        build([src, {"source_model": str(wide)}])
    mistral = make_tiny_model(tmp_path / "mistral", arch="mistral")
    with pytest.raises(UsageError, match="is a mistral model, base is llama"):
        build([src, {"source_model": str(mistral)}])
    qwen = make_tiny_model(tmp_path / "qwen", arch="qwen2")
    with pytest.raises(UsageError, match="needs a llama or mistral base"):
        build([{"source_model": str(qwen)}] * 2, base=qwen)
    with pytest.raises(UsageError, match="adapter directory not found"):
        build([src, {"adapter": str(tmp_path / "nope")}])
    with pytest.raises(UsageError, match="not found"):
        build([src, src], base=tmp_path / "no-base")
    other = random_lora_adapter(tmp_path / "other-ad", wide)
    with pytest.raises(UsageError, match="is on base"):
        build([src, {"adapter": str(other)}])
    assert not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(UsageError, match="not empty"):
        build_moe(spec(tiny_model, [src, src], gate_mode="random"), str(tmp_path / "full"))


# --------------------------------------------------------------------------- load balancing


def _hand_loss(probs_per_layer, E, k):
    p = torch.cat(probs_per_layer)
    T = p.shape[0]
    f = [sum(1.0 for t in range(T) if e in torch.topk(p[t], k).indices.tolist()) / T for e in range(E)]
    P = [p[:, e].mean().item() for e in range(E)]
    return E * sum(fe * pe for fe, pe in zip(f, P))


def test_load_balancing_loss_hand_computation():
    probs = [torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]), torch.tensor([[0.5, 0.1, 0.4], [0.2, 0.2, 0.6]])]
    # k=1: f = [2/4, 1/4, 1/4], P = [0.375, 0.275, 0.35] -> 3 * (0.1875 + 0.06875 + 0.0875) = 1.03125
    assert load_balancing_loss(probs, 3, 1).item() == pytest.approx(1.03125)
    assert load_balancing_loss(probs, 3, 2).item() == pytest.approx(_hand_loss(probs, 3, 2))
    logits = [torch.log(p) + 1.7 for p in probs]  # the same distribution given as logits
    assert load_balancing_loss(logits, 3, 2).item() == pytest.approx(_hand_loss(probs, 3, 2), rel=1e-5)
    assert load_balancing_loss(probs, 3, 2, inputs="probs") == load_balancing_loss(logits, 3, 2, inputs="logits")
    # attention mask: batch 1 x seq 2, the second token is padding -> only token 0 of each layer counts
    masked = load_balancing_loss(probs, 3, 1, attention_mask=torch.tensor([[1, 0]]))
    assert masked.item() == pytest.approx(_hand_loss([probs[0][:1], probs[1][:1]], 3, 1))
    uniform = [torch.full((4, 4), 0.25)]
    assert load_balancing_loss(uniform, 4, 2).item() == pytest.approx(2.0)  # balance = top_k


def test_transformers_mixtral_aux_loss_softmaxes_probabilities_twice(tiny_model, tmp_path):
    """huggingface/transformers#45120 on the installed version: the router returns probabilities and
    load_balancing_loss_func softmaxes them again. If a release fixes it this test fails: re-check."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    out = build_moe(spec(tiny_model, [{"source_model": str(tiny_model)}] * 4, gate_mode="random",
                         experts_per_token=2), str(tmp_path / "moe"))
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        res = model(IDS, output_router_logits=True)
    router_out = res.router_logits
    for layer_out in router_out:  # "router_logits" are already probabilities
        assert (layer_out >= 0).all() and torch.allclose(layer_out.sum(-1), torch.ones(IDS.shape[1]), atol=1e-5)
    ours = load_balancing_loss(router_out, 4, 2)
    assert res.aux_loss == pytest.approx(load_balancing_loss_func(router_out, 4, 2).item())
    assert res.aux_loss.item() != pytest.approx(ours.item(), rel=1e-3)  # the double softmax
    # Fed logits (log-probabilities), HF's function applies softmax once and agrees with ours.
    hf_once = load_balancing_loss_func(tuple(torch.log(p) for p in router_out), 4, 2)
    assert hf_once.item() == pytest.approx(ours.item(), rel=1e-5)
    # Double softmax squashes P_e towards uniform: softmax(p) of p in [0,1] has max/min <= e.
    twice = torch.softmax(router_out[0], -1)
    assert (twice.max(-1).values / twice.min(-1).values <= torch.e + 1e-5).all()
    # ours detects probabilities
    assert torch.equal(router_probs(router_out), torch.cat(router_out).float())


def test_router_trainable_params(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    out = build_moe(spec(tiny_model, [{"source_model": str(tiny_model)}] * 2, gate_mode="random"),
                    str(tmp_path / "moe"))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    names = router_trainable_params(model)
    assert names == ["model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"]
    params = dict(model.named_parameters())
    assert all(params[n].shape == (2, 64) for n in names)
    with pytest.raises(UsageError, match="no MoE router"):
        router_trainable_params(AutoModelForCausalLM.from_pretrained(tiny_model))


def test_chat_prompt_format_renders_through_template(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    experts = [{"source_model": str(tiny_model), "positive_prompts": ["abc"]},
               {"source_model": str(tiny_model), "positive_prompts": ["xyz"]}]
    out = build_moe(spec(tiny_model, experts, gate_mode="cheap_embed", prompt_format="chat"), str(tmp_path / "moe"))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    emb = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).model.embed_tokens.weight.detach()
    text = tok.apply_chat_template([{"role": "user", "content": "abc"}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids[-1] == BYTE_OFFSET + ord("\n")  # <|im_start|> ... "assistant\n"
    v = emb[ids].sum(0)
    assert torch.allclose(_gates(out)[0, 0], v / v.norm(), atol=1e-6)


def test_quantize_prompting_nf4_gates_close_to_full_precision(tiny_model, tmp_path, caplog):
    pytest.importorskip("bitsandbytes")
    experts = [{"source_model": str(tiny_model), "positive_prompts": ["hello there"]},
               {"source_model": str(tiny_model), "positive_prompts": ["x = 1 + 2"]}]
    with caplog.at_level(logging.WARNING):
        q = build_moe(spec(tiny_model, experts, gate_mode="hidden", quantize_prompting=True), str(tmp_path / "q"))
    if "NF4 load failed" in caplog.text:
        pytest.skip("bitsandbytes has no usable 4-bit backend here")
    f = build_moe(spec(tiny_model, experts, gate_mode="hidden"), str(tmp_path / "f"))
    cos = torch.nn.functional.cosine_similarity(_gates(q), _gates(f), dim=-1)
    assert (cos > 0.95).all() and not torch.equal(_gates(q), _gates(f))
