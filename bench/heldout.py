"""One neutral evaluator for every trainer's adapter: our eval's answer loss on 50 held-out rows.

The alpaca file is split once, deterministically: every trainer trains on the first rows
(`train.json`), and the last HELDOUT rows (`heldout.json`), which none of them sees, are scored.
The score is `finetune eval`'s `loss` metric (finetune.eval.loglik.score_loss: mean NLL per answer
token, prompts rendered through the model's chat template as in training), computed by the same
code for all, in fp32: ours' and TRL's adapters are peft adapters on the base; litgpt's LoRA
(fused qkv, its own names) is merged by litgpt's own merge_lora (in fp32) and converted by its
convert_lit_checkpoint into a transformers model, which is scored the same way -- the same loss
formula on a merged model instead of base + adapter (the two agree to float rounding).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

HELDOUT = 50


def split_rows(src: Path, dst: Path, heldout: int = HELDOUT) -> dict:
    """Write dst/train.json (all but the last `heldout` rows) and dst/heldout.json (those)."""
    rows = json.loads(src.read_text())
    if len(rows) <= heldout:
        raise ValueError(f"{src}: {len(rows)} rows, need more than {heldout}")
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "train.json").write_text(json.dumps(rows[:-heldout]))
    (dst / "heldout.json").write_text(json.dumps(rows[-heldout:]))
    return {"train_rows": len(rows) - heldout, "heldout_rows": heldout,
            "heldout_slice": f"rows {len(rows) - heldout}..{len(rows) - 1} of {src.name} (0-based; the last {heldout})"}


def merged_instruction_rows(src: Path, dst: Path) -> Path:
    """The rows with `input` folded into `instruction` as ours builds the user turn: litgpt's chat
    prompt styles (SmolLM2's ChatML) format only the instruction."""
    rows = json.loads(src.read_text())
    out = [{"instruction": f"{r['instruction']}\n\n{r['input']}" if r.get("input", "").strip() else r["instruction"],
            "input": "", "output": r["output"]} for r in rows]
    dst.write_text(json.dumps(out))
    return dst


def write_suite(dst: Path, seq_len: int) -> Path:
    path = dst / "heldout-suite.yaml"
    path.write_text(
        "name: heldout\ndescription: answer loss on alpaca rows no trainer saw\nprompt: chat\ntasks:\n"
        f"  - name: alpaca\n    data: {dst / 'heldout.json'}\n    format: alpaca\n    rows: all\n"
        f"    metrics: [loss]\n    seq_len: {seq_len}\n    batch_size: 8\n")
    return path


def litgpt_to_hf(final_dir: Path, base: Path, out: Path) -> Path:
    """litgpt's final LoRA checkpoint -> a merged transformers model dir (fp32)."""
    import torch
    from litgpt.scripts.convert_lit_checkpoint import convert_lit_checkpoint
    from litgpt.scripts.merge_lora import merge_lora
    from transformers import AutoModelForCausalLM

    lora = final_dir / "lit_model.pth.lora"
    sd = torch.load(lora, map_location="cpu")
    sd = sd.get("model", sd)
    # merge_lora merges in the LoRA file's dtype: in fp32 the base keeps its fp32 weights, as ours'
    # and TRL's adapters are scored on the fp32 base
    torch.save({k: v.float() for k, v in sd.items()}, lora)
    merge_lora(final_dir, precision="32-true")
    convert_lit_checkpoint(final_dir, out / "converted")
    weights = torch.load(out / "converted" / "model.pth", map_location="cpu")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"litgpt -> transformers: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(out / "merged")
    for f in base.iterdir():  # tokenizer and chat template, as the base ships them
        if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges",
                                              "generation_config")):
            shutil.copy(f, out / "merged" / f.name)
    shutil.rmtree(out / "converted")
    return out / "merged"


def score(models: dict[str, str], base: Path, split_dir: Path, seq_len: int, out: Path) -> dict[str, float]:
    """{trainer: held-out loss} through finetune.eval.evaluate, one run, base loaded once."""
    from finetune.eval import evaluate

    suite = write_suite(split_dir, seq_len)
    names = list(models)
    card = evaluate(str(suite), ["base", *[models[n] for n in names]], out, device="cpu", dtype="float32",
                    show=False, overwrite=True, recipe_model=str(base))
    cols = [m["name"] for m in card["models"]]  # in the order given: base, then `names`
    return {trainer: round(float(card["scores"][col]["alpaca/loss"]), 5)
            for col, trainer in zip(cols, ["base", *names])}
