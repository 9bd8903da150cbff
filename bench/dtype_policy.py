"""Which tensors hold which dtype: peft's k-bit preparation alone vs finetune's dtype policy.

    python bench/dtype_policy.py [--recipe qlora-7b-alpaca] [--out bench/results/dtype-policy-cpu.json]

The GPU path's dtypes emulated on the CPU (precision=bf16-true: bf16 base and compute, fp32 LoRA)
on a small random model (hidden 256, 2 layers, vocab 2048) with the recipe's quant/LoRA/optimizer
settings. For each of "peft-upcast" (prepare_model_for_kbit_training's fp32 embeddings, head and
norms left in place) and "policy" (finetune.runtime.kbit_frozen_dtypes applied by
finetune.models.load): bytes by planner part and dtype after one step, the dtype of the layer
inputs gradient checkpointing keeps, and finetune.plan.predict's static parts for the same config.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STATIC = ("quantized_weights", "base_weights", "unquantized_weights", "lora_params", "optimizer_state")


def run(recipe: str, model_dir: Path, upcast: bool) -> dict:
    import torch

    from finetune.config import load_config
    from finetune.models import load as load_mod
    from finetune.models.load import load_tokenizer
    from finetune.runtime import kbit_frozen_dtypes
    from finetune.training.build import build_step
    from finetune.training.measure import static_bytes
    from finetune.training.objectives.sft import synthetic_batch

    load_mod.kbit_frozen_dtypes = ((lambda cfg, device: {"embeddings": None, "norms": None}) if upcast
                                   else kbit_frozen_dtypes)
    cfg = load_config(recipe, {"model.name": str(model_dir), "accelerator": "cpu", "precision": "bf16-true",
                               "model.attn_implementation": "sdpa", "output.progress": "false",
                               "train.gradient_checkpointing": "true"})
    torch.manual_seed(0)
    step = build_step(cfg, "cpu", load_tokenizer(cfg.model))
    seen = set()
    hooks = [m.register_forward_pre_hook(lambda m, a, kw: seen.add(str((a[0] if a else kw["hidden_states"]).dtype)),
                                         with_kwargs=True) for m in step.model.base_model.model.model.layers]
    b = synthetic_batch(step.model.get_output_embeddings().weight.shape[0], 1, 64)
    loss, n = step.lossmod(b["input_ids"], b["labels"], b["position_ids"])
    for h in hooks:
        h.remove()
    (loss / n).backward()
    step.optimizer.step()
    by_name = {}
    for name, p in step.model.named_parameters():
        kind = ("lora" if "lora_" in name else "norm" if "norm" in name else "embed_tokens" if "embed_tokens" in name
                else "lm_head" if "lm_head" in name else "linear (4-bit)" if cfg.quant.mode != "none" else "linear")
        by_name.setdefault(kind, set()).add(str(p.dtype).replace("torch.", ""))
    return {"param_dtypes": {k: sorted(v) for k, v in by_name.items()}, "bytes_by_part_dtype": static_bytes(step.model, step.optimizer),
            "checkpointed_layer_input_dtypes": sorted(seen)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="qlora-7b-alpaca")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "dtype-policy-cpu.json"))
    a = ap.parse_args()
    import torch

    from finetune.config import load_config
    from finetune.models.tiny import make_tiny_model
    from finetune.plan.predict import predict

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(Path(tmp) / "m", hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=2048,
                                    tie_word_embeddings=False)
        out = {"command": "python bench/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "recipe": a.recipe}
        for mode in ("peft-upcast", "policy"):
            out[mode] = run(a.recipe, model_dir, mode == "peft-upcast")
        cfg = load_config(a.recipe, {"model.name": str(model_dir), "accelerator": "cpu", "precision": "bf16-true"})
        plan = predict(cfg, 1, 64)
        out["planner_static_parts"] = {k: plan.parts[k] for k in STATIC if k in plan.parts}
    for mode in ("peft-upcast", "policy"):
        r = out[mode]
        print(f"{mode:12s} params: {r['param_dtypes']}; checkpointed layer inputs: {r['checkpointed_layer_input_dtypes']}")
        for part in STATIC:
            if part in r["bytes_by_part_dtype"]:
                got = sum(r["bytes_by_part_dtype"][part].values())
                print(f"  {part:20s} {r['bytes_by_part_dtype'][part]}  total {got}  planner {out['planner_static_parts'].get(part)}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
