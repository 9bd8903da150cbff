"""Streaming MoE assembly at the size people build: 8 LoRA experts on a Llama-3.2-1B-shape base.

    python bench/moe_stream.py [--work /tmp/moe-stream] [--experts 8] [--gate_mode hidden] [--keep]
                               [--out bench/results/moe_stream.json]

1. writes a random Llama-3.2-1B-shape base in bf16 (16 layers, hidden 2048, MLP 8192, GQA 32/8,
   vocab 128256, tied embeddings; N(0, 0.02) weights, written tensor by tensor) with the embedded
   SmolLM2 tokenizer, and 8 random LoRA adapters (r 16 on the MLPs and q/v_proj, lora_B != 0);
2. runs `finetune moe` on them in a child process and records its peak resident memory (the
   child's ru_maxrss from wait4, so the generation in step 1 does not count), wall time and
   output size (issue 17 target: peak <= 3 GiB);
3. checks the output without loading 14 GB: MixtralForCausalLM built from its config on the meta
   device has exactly the checkpoint's tensors (names, shapes, dtypes), and a few expert weights
   equal base + that adapter's delta, rounded to bf16.
Generated inputs and the output are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import yaml  # noqa: E402

from bench.common import cpu_model, versions  # noqa: E402

SHAPE = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
             rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192})
TOPICS = ["geography", "unit conversion", "reviews", "python code", "algebra", "recipes", "history", "chemistry"]


def write_base(path: Path) -> None:
    """The random base, one tensor in memory at a time (finetune's own streaming writer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from finetune.models.embedded import embedded_model_dir
    from finetune.moe.stream import ShardWriter

    cfg = LlamaConfig(**SHAPE)
    cfg.dtype = torch.bfloat16
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    layout = {k: t for k, t in meta.state_dict().items() if k != "lm_head.weight"}
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    w = ShardWriter(path, layout, "5GB")
    for k, t in layout.items():
        x = torch.ones(t.shape) if k.endswith("norm.weight") else torch.randn(t.shape, generator=gen) * 0.02
        w.write(k, x.to(torch.bfloat16))
    w.finish()
    cfg.save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(path)


def write_adapter(path: Path, base: Path, seed: int, r: int = 16) -> None:
    from peft import LoraConfig
    from safetensors.torch import save_file

    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj", "v_proj"],
                     lora_dropout=0.0, task_type="CAUSAL_LM", base_model_name_or_path=str(base))
    gen = torch.Generator().manual_seed(100 + seed)
    H, I, kv = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
    shapes = {"mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I),
              "self_attn.q_proj": (H, H), "self_attn.v_proj": (kv, H)}
    tensors = {}
    for li in range(SHAPE["num_hidden_layers"]):
        for mod, (out_f, in_f) in shapes.items():
            pre = f"base_model.model.model.layers.{li}.{mod}"
            tensors[f"{pre}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) * 0.02
            tensors[f"{pre}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * 0.01
    path.mkdir(parents=True)
    cfg.save_pretrained(path)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})


def run_build(config: Path, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, "-m", "finetune.cli", "moe", f"config={config}", f"out_dir={out}", "overwrite=true"]
    t = time.time()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"finetune moe failed: {' '.join(cmd)}")
    return {"command": " ".join(cmd[1:]), "wall_s": round(wall, 1),
            "peak_rss_gib": round(usage.ru_maxrss * 1024 / 2 ** 30, 3)}  # ru_maxrss is in KiB


def check_output(out: Path, base: Path, adapter: Path) -> dict:
    from transformers import AutoConfig, MixtralForCausalLM

    from finetune.models.adapters import read_adapter_config
    from finetune.moe.stream import AdapterDeltas, ModelTensors

    cfg = AutoConfig.from_pretrained(out)
    with torch.device("meta"):
        model = MixtralForCausalLM(cfg)
    assert type(model).__name__ == "MixtralForCausalLM" and cfg.num_local_experts >= 2
    got = ModelTensors(str(out), "moe")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    n_params = sum(p.numel() for p in model.parameters())
    assert index["metadata"]["total_parameters"] == n_params, (index["metadata"], n_params)
    # names and shapes: the fused in-memory experts are E per-expert w1/w3/w2 on disk
    li = SHAPE["num_hidden_layers"] - 1
    b, d = ModelTensors(str(base), "base"), AdapterDeltas(str(adapter), read_adapter_config(str(adapter)),
                                                         ("gate_proj", "up_proj", "down_proj"))
    for part, wname in (("gate_proj", "w1"), ("down_proj", "w2")):
        module = f"model.layers.{li}.mlp.{part}"
        want = (b.get(f"{module}.weight").float() + d.delta(module)).to(torch.bfloat16)
        assert torch.equal(got.get(f"model.layers.{li}.block_sparse_moe.experts.0.{wname}.weight"), want), wname
    assert torch.equal(got.get("model.layers.3.self_attn.q_proj.weight"), b.get("model.layers.3.self_attn.q_proj.weight"))
    return {"loads_as": "MixtralForCausalLM (meta device, from the written config)", "parameters": n_params,
            "tensors": len(index["weight_map"]), "expert_weights_checked": "layer 15 expert 0 w1, w2 == base + delta"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/moe-stream")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--gate_mode", default="hidden")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_stream.json"))
    a = ap.parse_args()
    work = Path(a.work)
    if work.exists():
        shutil.rmtree(work)
    t = time.time()
    write_base(work / "base")
    adapters = [work / f"expert-{i}" for i in range(a.experts)]
    for i, p in enumerate(adapters):
        write_adapter(p, work / "base", i)
    gen_s = time.time() - t
    spec = {"base_model": str(work / "base"), "gate_mode": a.gate_mode, "dtype": "bfloat16", "experts_per_token": 2,
            "experts": [{"adapter": str(p), "positive_prompts": [f"A question about {TOPICS[i % len(TOPICS)]}"],
                         "negative_prompts": [f"A question about {TOPICS[(i + 1) % len(TOPICS)]}"]}
                        for i, p in enumerate(adapters)]}
    config = work / "moe.yaml"
    config.write_text(yaml.safe_dump(spec))
    build = run_build(config, work / "moe")
    size = sum(f.stat().st_size for f in (work / "moe").iterdir())
    check = check_output(work / "moe", work / "base", adapters[0])
    result = {"machine": f"{os.cpu_count()} CPU cores ({cpu_model()}), shared", "versions": versions(
              ["torch", "transformers", "peft", "safetensors"]),
              "setup": f"{a.experts} LoRA experts (r16 on MLP + q/v) on a random Llama-3.2-1B-shape base, bf16, "
                       f"gate_mode {a.gate_mode}", "generate_inputs_s": round(gen_s, 1),
              **build, "output_gb": round(size / 1e9, 2), "target_peak_rss_gib": 3.0,
              "ok": build["peak_rss_gib"] <= 3.0, "check": check,
              "bench_command": f"python bench/moe_stream.py --experts {a.experts} --gate_mode {a.gate_mode}"}
    if not a.keep:
        shutil.rmtree(work)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
