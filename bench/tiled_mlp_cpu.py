"""MLP tiles on the CPU: peak memory of one training micro-batch, untiled vs tiled, and the planner's
prediction of the difference.

    python bench/tiled_mlp_cpu.py [--seq 8192] [--tiles 0,2048,512] [--out bench/results/tiled_mlp_cpu.json]

A random-init Llama with Llama-3.1-8B's proportions scaled down (hidden 256, MLP 896 = 3.5x, 8 heads,
2 k/v heads, 2 layers) is loaded through finetune.model.load_model, as training loads it (LoRA r=16
all-linear, dropout 0, the lean patches, gradient checkpointing on, fp32), then one forward +
backward of a seq-long sequence runs through finetune.train.CausalLMLoss (loss chunks of 256) under
torch.profiler(profile_memory=True). The peak is the highest "Total Allocated" of the profile's
memory events: bytes the allocator holds above what it held when the profile started (weights and
LoRA parameters were already there). The planner's counterpart is activations + logits + backward
workspace + LoRA gradients (accelerator=cpu: no CUDA context). Prints one line per tile size and
writes JSON. The tiles change where memory goes on a GPU the same way; only the GPU bench measures it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import importlib  # noqa: E402

import torch  # noqa: E402

from finetune import plan  # noqa: E402
from finetune.config import load_config  # noqa: E402

train_mod = importlib.import_module("finetune.train")  # finetune.train is also the function
SHAPE = dict(hidden_size=256, intermediate_size=896, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=32768, rope_theta=500000.0, rms_norm_eps=1e-5,
             tie_word_embeddings=False)


def model_dir(root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.tiny import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE, vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=None,
                                 eos_token_id=tok.eos_token_id)).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def profile_peak(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")


def measure(path: Path, seq: int, tile: int) -> dict:
    from finetune.model import load_model

    cfg = load_config(None, {
        "model.name": str(path), "accelerator": "cpu", "data.seq_len": str(seq), "lora.r": "16", "lora.alpha": "32",
        "lora.dropout": "0.0", "lora.target_modules": "[all-linear]", "train.gradient_checkpointing": "true",
        "train.loss_chunk_size": "256", "train.mlp_tile_size": str(tile), "train.micro_batch_size": "1"})
    torch.manual_seed(0)
    model = load_model(cfg, "cpu").train()
    lossmod = train_mod.CausalLMLoss(model, chunk=cfg.train.loss_chunk_size)
    ids = torch.randint(3, 259, (1, seq), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, : seq // 2] = -100  # half the positions trained, like a prompt + answer

    def step():
        loss, n = lossmod(ids, labels, torch.arange(seq)[None])
        (loss / n).backward()

    step()  # warm-up: lazily created buffers and the LoRA gradients exist before the measured step
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    peak = profile_peak(step)
    seconds = time.perf_counter() - t0
    p = plan.predict(cfg, 1, seq, slack=0.0)
    predicted = sum(p.parts[k] for k in ("activations", "logits_loss", "backward_workspace", "lora_grads"))
    return {"tile": tile, "measured_peak_bytes": peak, "predicted_bytes": predicted,
            "step_s_profiled": round(seconds, 2),
            "planner_parts": {k: p.parts[k] for k in ("activations", "logits_loss", "backward_workspace")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--tiles", type=lambda s: [int(x) for x in s.split(",")], default=[0, 2048, 512])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "tiled_mlp_cpu.json"))
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir(Path(tmp))
        for tile in a.tiles:
            r = measure(path, a.seq, tile)
            rows.append(r)
            print(f"tile {tile:5d}: measured peak {r['measured_peak_bytes'] / 2**20:8.1f} MiB, planner "
                  f"{r['predicted_bytes'] / 2**20:8.1f} MiB, step {r['step_s_profiled']} s under the profiler")
    out = {"what": "peak CPU bytes of one forward+backward above the loaded model, MLP tiles vs none",
           "command": "python " + " ".join(["bench/tiled_mlp_cpu.py", *sys.argv[1:]]),
           "shape": SHAPE, "seq_len": a.seq, "rows": rows,
           "hardware": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()},
           "versions": {p: version(p) for p in ("torch", "transformers", "peft")},
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
