"""The preference demo's scorecard: held-out pairs scored for the base model, the demo's SFT model and
the DPO adapter trained on it (scripts/pref_demo.sh runs the whole demo).

    python scripts/pref_demo.py OUT [--data eval/data/demo-pref.jsonl]

OUT holds `merged/` (the SFT demo adapter merged into SmolLM2) and `dpo/final/` (the DPO adapter on
it). Per model: the win rate, the share of held-out pairs whose chosen answer has the higher mean
log-probability per counted token (length-normalised, so a shorter answer does not win by being
short); for the DPO adapter also the reward accuracy against its reference (the SFT model): the
share of pairs with beta * (log-ratio chosen - log-ratio rejected) > 0. Writes OUT/pref_scores.json.
The answers' tokens are exactly what DPO trained on (finetune.data.preference), in fp32.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from finetune.config import DataConfig
from finetune.data.pipeline import get_renderer
from finetune.data.preference import encode_example
from finetune.data.preference_formats import read_preference_rows
from finetune.models.load import load_inference_model, load_tokenizer, resolve_model_path
from finetune.training.objectives.logprobs import sequence_logps, sequence_rows

SYSTEM_PROMPT = "Answer briefly."  # the demo recipes' data.system_prompt


def logps(model, seqs, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of the counted tokens' log-probs of each (prompt, answer), 8 at a time."""
    sums, counts = [], []
    with torch.no_grad():
        for i in range(0, len(seqs), 8):
            part = seqs[i:i + 8]
            rows = sequence_rows(part, pad_id)
            s, k = sequence_logps(model, rows["input_ids"], rows["position_ids"], rows["seq_index"], len(part))
            sums.append(s)
            counts.append(k)
    return torch.cat(sums), torch.cat(counts)


def score(model, tokenizer, pairs) -> dict:
    """Mean log-prob per token of chosen and rejected, per pair: the win rate's inputs."""
    chosen = [(p, a[0]) for p, a in pairs]
    rejected = [(p, a[1]) for p, a in pairs]
    cs, ck = logps(model, chosen, tokenizer.pad_token_id)
    rs, rk = logps(model, rejected, tokenizer.pad_token_id)
    return {"chosen_sum": cs, "rejected_sum": rs, "win": (cs / ck > rs / rk).float()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--data", default="eval/data/demo-pref.jsonl")
    ap.add_argument("--base", default="smollm2-135m")
    args = ap.parse_args()
    out = Path(args.out)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(out / "merged"))
    renderer = get_renderer(tokenizer, DataConfig(system_prompt=SYSTEM_PROMPT))
    held = read_preference_rows(args.data, system_prompt=SYSTEM_PROMPT)
    pairs = [encode_example(renderer, ex) for ex in held.examples]

    results, scored = {}, {}
    base = load_inference_model(resolve_model_path(args.base), torch.float32, "cpu")
    scored["base"] = score(base, tokenizer, pairs)
    del base
    sft = load_inference_model(str(out / "merged"), torch.float32, "cpu")
    scored["sft"] = score(sft, tokenizer, pairs)
    from peft import PeftModel

    dpo = PeftModel.from_pretrained(sft, str(out / "dpo" / "final")).eval()
    scored["dpo"] = score(dpo, tokenizer, pairs)
    for name, s in scored.items():
        results[name] = {"win_rate": round(100 * s["win"].mean().item(), 1)}
    margin = (scored["dpo"]["chosen_sum"] - scored["sft"]["chosen_sum"]) - (
        scored["dpo"]["rejected_sum"] - scored["sft"]["rejected_sum"])
    results["dpo"]["reward_accuracy_vs_sft"] = round(100 * (margin > 0).float().mean().item(), 1)
    results["pairs"] = len(pairs)
    (out / "pref_scores.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"held-out pairs: {len(pairs)} ({args.data})")
    print("| model | win rate (chosen more likely per token), % | reward accuracy vs the SFT reference, % |")
    print("|---|---:|---:|")
    names = {"base": "base SmolLM2-135M-Instruct", "sft": "SFT demo adapter (merged)", "dpo": "after DPO"}
    for key, label in names.items():
        acc = results[key].get("reward_accuracy_vs_sft", "")
        print(f"| {label} | {results[key]['win_rate']:.1f} | {acc if acc == '' else f'{acc:.1f}'} |")


if __name__ == "__main__":
    main()
