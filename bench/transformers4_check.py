"""Do finetune's outputs load and compute the same under transformers 4.57 as under 5.x?

    python bench/transformers4_check.py [--work DIR] [--venv DIR]

Writes, with the transformers 5 of this environment and finetune's own writers, on the embedded
SmolLM2-135M-Instruct (rope_theta 100000: a 4.x that misses it runs 10000 and the logits differ by
up to ~9): a LoRA adapter with its tokenizer (training's checkpoint writer), the merged model
(`finetune merge`) and a two-expert MoE (`finetune moe`). Then a transformers 4.57 environment loads
each with plain peft / AutoModelForCausalLM / AutoTokenizer and compares fp32 logits and token ids.

The 4.57 environment is a venv (default ~/.cache/finetune/tf4-venv) with transformers 4.57 and
huggingface_hub < 1.0 of its own; torch and peft are this environment's, reached through a .pth
file written after the install (so pip never sees, or touches, this environment's transformers).
Exit 0 when every max |logit diff| <= 1e-4 and the token ids match.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

TOL = 1e-4
PROBE = [{"role": "user", "content": "What is the capital of France? Answer in one word."},
         {"role": "assistant", "content": "Paris."}]


def ensure_venv(venv: Path) -> Path:
    py = venv / "bin" / "python"
    stamp = venv / ".finetune-tf4"
    if stamp.is_file():
        return py
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "transformers==4.57.*", "huggingface_hub<1.0"], check=True)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # After the install: torch, peft, safetensors ... from here, behind the venv's own packages.
    (Path(site) / "zz_finetune_parent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    stamp.write_text("transformers 4.57\n")
    return py


def make_outputs(work: Path) -> dict:
    """Adapter, merged model and MoE written by finetune under transformers 5, and their logits."""
    import torch
    import yaml
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.merge import merge_adapter
    from finetune.models.load import load_tokenizer, resolve_model_path
    from finetune.training.checkpoint import save_checkpoint

    base_dir = resolve_model_path("smollm2-135m")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    adapter = save_checkpoint(work / "adapter", model=model, tokenizer=load_tokenizer("smollm2-135m"),
                              config_yaml="model: {name: smollm2-135m}\n", step=0)
    merged = merge_adapter(str(adapter), str(work / "merged"), overwrite=True)
    moe_yaml = work / "moe.yaml"
    moe_yaml.write_text(yaml.safe_dump({"base_model": base_dir, "gate_mode": "random", "seed": 1,
                                        "experts": [{"source_model": base_dir}, {"source_model": str(merged)}]}))
    moe = work / "moe"  # through the command: the MoE builder's internals may change
    subprocess.run([sys.executable, "-m", "finetune", "moe", f"config={moe_yaml}", f"out_dir={moe}",
                    "overwrite=true"], check=True)

    ref = {}
    for name, path in (("adapter", adapter), ("merged", merged), ("moe", moe)):
        tok = AutoTokenizer.from_pretrained(str(path))
        ids = tok.apply_chat_template(PROBE, tokenize=True, return_dict=True)["input_ids"]
        if name == "adapter":
            net = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                            str(path))
        else:
            net = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        with torch.no_grad():
            logits = net.eval()(torch.tensor([ids])).logits[0]
        torch.save(logits, work / f"{name}.logits.pt")
        ref[name] = {"path": str(path), "ids": ids}
    ref["base_dir"] = base_dir
    (work / "ref.json").write_text(json.dumps(ref, indent=1))
    return ref


CHILD = textwrap.dedent("""
    import json, sys, torch, transformers
    from pathlib import Path
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from peft import PeftModel
    work = Path(sys.argv[1]); ref = json.loads((work / "ref.json").read_text())
    probe = json.loads(sys.argv[2]); out = {"transformers": transformers.__version__}
    for name in ("adapter", "merged", "moe"):
        path = ref[name]["path"]
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok.apply_chat_template(probe, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) else list(ids)
        if name == "adapter":
            base = AutoModelForCausalLM.from_pretrained(ref["base_dir"], torch_dtype=torch.float32)
            net = PeftModel.from_pretrained(base, path)
            cfg = base.config
        else:
            net = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
            cfg = net.config
        with torch.no_grad():
            logits = net.eval()(torch.tensor([ref[name]["ids"]])).logits[0]
        want = torch.load(work / f"{name}.logits.pt")
        out[name] = {"tokenizer": type(tok).__name__, "ids_match": ids == ref[name]["ids"],
                     "rope_theta": getattr(cfg, "rope_theta", None), "arch": type(net).__name__,
                     "max_abs_diff": (logits - want).abs().max().item()}
    print(json.dumps(out))
""")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/finetune-tf4-check")
    ap.add_argument("--venv", default=str(Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache/finetune"))
                                         / "tf4-venv"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    py = ensure_venv(Path(args.venv))
    make_outputs(work)
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}  # only 4.57, never this checkout's code
    res = subprocess.run([str(py), "-c", CHILD, str(work), json.dumps(PROBE)], env=env, capture_output=True,
                         text=True)
    if res.returncode != 0:
        print(res.stderr[-3000:], file=sys.stderr)
        return 1
    report = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"transformers {report.pop('transformers')} loading finetune's transformers-5 outputs (fp32, tol {TOL}):")
    ok = True
    for name, r in report.items():
        good = r["ids_match"] and r["max_abs_diff"] <= TOL
        ok &= good
        print(f"  {name:<8} {r['arch']:<28} tokenizer {r['tokenizer']:<24} ids match {r['ids_match']!s:<5} "
              f"rope_theta {r['rope_theta']}  max |diff| {r['max_abs_diff']:.2e}  {'OK' if good else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
