"""The streaming MoE build is bit-identical to the in-memory build it replaced (issue 17).

`inmemory_moe` below is the previous assembly, kept as the reference: whole fp32 models, adapters
merged by peft's `merge_and_unload`, a MixtralForCausalLM filled and saved by `save_pretrained`.
"""

import json

import pytest
import torch
from safetensors import safe_open
from tiny_peft import random_lora_adapter
from transformers import AutoConfig, AutoModelForCausalLM

from finetune.moe.build import build_moe, mixtral_config
from finetune.moe.spec import parse_moe_config
from finetune.portable import portable_config


@pytest.fixture(scope="module")
def experts(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-eq")
    a = random_lora_adapter(root / "a", tiny_model, seed=1, scale=0.1)
    b = random_lora_adapter(root / "b", tiny_model, seed=2, scale=0.1, target_modules=["gate_proj", "down_proj"],
                            use_rslora=True)
    full = root / "full"  # a "full fine-tune": the base with a merged adapter
    from peft import PeftModel
    m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), str(a))
    m.merge_and_unload().save_pretrained(full)
    return {"a": str(a), "b": str(b), "full": str(full)}


def inmemory_moe(spec, tiny_model, gates):
    """The pre-streaming build's tensors (state dict of the MixtralForCausalLM it saved)."""
    from peft import PeftModel

    def mlp_of(model):
        return [{p: getattr(l.mlp, p).weight.detach().float().clone() for p in ("gate_proj", "up_proj", "down_proj")}
                for l in model.model.layers]

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    cfg = mixtral_config(AutoConfig.from_pretrained(tiny_model), len(spec.experts), spec.experts_per_token,
                         torch.float32)
    moe = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    sd = moe.state_dict()
    gen = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for k, v in base.state_dict().items():
            if ".mlp." not in k:
                sd[k].copy_(v)
        for li, layer in enumerate(moe.model.layers):
            layer.mlp.gate.weight.copy_(gates[li])
        for ei, e in enumerate(spec.experts):
            if e.adapter:
                fresh = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
                mlp = mlp_of(PeftModel.from_pretrained(fresh, e.adapter).merge_and_unload())
            else:
                mlp = mlp_of(AutoModelForCausalLM.from_pretrained(e.source_model, dtype=torch.float32))
            for w in mlp:
                for p, t in w.items():
                    if e.noise_scale:
                        t += torch.randn(t.shape, generator=gen) * e.noise_scale
                    if p == "down_proj" and e.residual_scale is not None:
                        t *= e.residual_scale
            for li, layer in enumerate(moe.model.layers):
                w = mlp[li]
                layer.mlp.experts.gate_up_proj[ei].copy_(torch.cat([w["gate_proj"], w["up_proj"]]))
                layer.mlp.experts.down_proj[ei].copy_(w["down_proj"])
    return moe


def saved_tensors(out_dir):
    found = {}
    for f in sorted(out_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                found[k] = h.get_tensor(k)
    return found


CASES = {
    "adapters+full+noise": dict(experts=["a", "b", "full"], noise=True, dtype="float32", gate_mode="random"),
    "bf16-hidden": dict(experts=["a", "full"], noise=False, dtype="bfloat16", gate_mode="hidden"),
    "cheap-embed": dict(experts=["b", "a"], noise=False, dtype=None, gate_mode="cheap_embed"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streaming_build_equals_inmemory_build(tiny_model, experts, tmp_path, case):
    c = CASES[case]
    raw = []
    for i, name in enumerate(c["experts"]):
        e = {"adapter" if name != "full" else "source_model": experts[name],
             "positive_prompts": [f"prompt {i} about {name}"], "negative_prompts": ["other"]}
        if c["noise"]:
            e.update(noise_scale=0.01 * (i + 1), residual_scale=0.5 + i)
        raw.append(e)
    spec = parse_moe_config({"base_model": str(tiny_model), "experts": raw, "gate_mode": c["gate_mode"],
                             "dtype": c["dtype"], "seed": 3})
    out = build_moe(spec, str(tmp_path / "moe"), max_shard_size="20KB")  # several shards
    assert len(list(out.glob("*.safetensors"))) > 1
    got = saved_tensors(out)
    with safe_open(next(out.glob("*.safetensors")), "pt") as h:
        assert h.metadata() == {"format": "pt"}
    # the in-memory build with the same gates, saved the way it was
    gates = torch.stack([got[f"model.layers.{li}.block_sparse_moe.gate.weight"].float() for li in range(2)])
    ref = inmemory_moe(spec, tiny_model, gates)
    out_dtype = got["model.embed_tokens.weight"].dtype
    ref.to(out_dtype)
    ref.config.dtype = out_dtype
    ref_dir = tmp_path / "ref"
    ref.save_pretrained(ref_dir, safe_serialization=True)
    portable_config(ref_dir)  # what every finetune output adds for transformers 4.x (legacy rope keys)
    want = saved_tensors(ref_dir)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert json.loads((out / "config.json").read_text()) == json.loads((ref_dir / "config.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(want)
