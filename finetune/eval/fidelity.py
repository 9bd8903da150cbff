"""Does what `finetune merge` / `finetune export` wrote still answer as the adapter did?

The reference is the adapter as it was trained: on its own base, quantized as in training (NF4
for QLoRA; finetune.models.trained). The candidate is the merged model (for export: the merged
model that went into the converter). Both run a few held-out rows (the recipe's validation rows,
as training split them, or `fidelity.data=FILE`) in the inference dtype (fp32 on CPU, bf16 on
GPU), one model in memory at a time, and are compared on:

- next-token top-1 agreement over the scored (assistant) tokens,
- mean KL(reference || candidate) per token,
- perplexity of each on the same tokens,
- greedy continuations of each row's prompt, side by side.

`fidelity.json` goes beside the output and one line sums it up; `fidelity.min_agreement` makes
it a gate: below it, the output is kept but renamed OUT.fidelity-failed, and the command fails.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import torch

from finetune.config import DataConfig
from finetune.data.formats import Format
from finetune.data.mix import source_config
from finetune.data.pipeline import load_conversations, render_prompt, tokenize_conversation
from finetune.errors import FinetuneError, UsageError
from finetune.data.rows import read_json_rows
from finetune.eval.generate import generate
from finetune.eval.prompting import to_conversation
from finetune.eval.suites import GenerationSpec, example_from_row
from finetune.fs import atomic_write
from finetune.models.adapters import load_for_inference
from finetune.models.load import load_gguf
from finetune.models.trained import load_as_trained, run_config
from finetune.ranges import ranged
from finetune.runtime import inference_device, inference_dtype

log = logging.getLogger(__name__)

REPORT = "fidelity.json"
FAILED_SUFFIX = ".fidelity-failed"
MAX_TOKENS = 256  # per row: enough to compare, and the reference's log-probs stay small at 128k vocabularies


@dataclass
class FidelitySettings:
    """fidelity.*: the report comparing a merged/exported model with the adapter as trained."""

    n: int = ranged(4, ge=0)
    """Held-out rows compared (0 = no report)."""
    data: Optional[str] = None
    """Rows to compare on (a json/jsonl/csv/parquet file); default: the recipe's validation rows."""
    format: Optional[Union[Format, Literal["eval"]]] = None
    """Row format of fidelity.data: a training format, or eval (an eval suite's held-out rows:
    messages/prompt + answer); default: the training run's data.format."""
    max_new_tokens: int = ranged(24, ge=1)
    """Length of the greedy continuations compared side by side."""
    min_agreement: Optional[float] = ranged(None, ge=0, le=1)
    """Gate: fail (exit 1, output renamed OUT.fidelity-failed) below this next-token top-1 agreement."""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda, ..."""


@dataclass
class Plan:
    """What will be compared, decided before the merge runs (a bad setting costs no merge)."""

    adapter: str
    base: Optional[str]
    settings: FidelitySettings
    data_cfg: DataConfig
    rows: list
    source: str
    skip: Optional[str] = None


def failed_name(out_dir) -> Path:
    out = Path(os.path.expanduser(str(out_dir)))
    return out.with_name(out.name + FAILED_SUFFIX)


def plan(adapter: Optional[str], settings: FidelitySettings, out_dir, base: Optional[str] = None) -> Plan:
    """Read the rows to compare on (cheap) and check the gate can be applied; a Plan whose `skip`
    says why there is no report when there is none to make."""
    s = settings
    gate = s.min_agreement is not None
    empty = Plan(str(adapter), base, s, DataConfig(), [], "")
    if s.n == 0 or not adapter:
        why = "fidelity.n=0" if s.n == 0 else "no adapter to compare with (model= is exported as it is)"
        if gate:
            raise UsageError(f"fidelity.min_agreement needs a report, but {why}")
        empty.skip = why
        return empty
    if gate and failed_name(out_dir).exists():
        raise UsageError(f"{failed_name(out_dir)} exists (a failed earlier output); move it away before gating again")
    cfg = run_config(adapter)
    if s.data and s.format == "eval":  # an eval suite's rows: prompt + reference answer
        data = dataclasses.replace(cfg.data) if cfg is not None else DataConfig()
        data.cache, data.chat_template = False, None
        rows = read_json_rows(s.data, "fidelity.data").rows[: s.n]
        convs = [to_conversation(example_from_row(r, f"{s.data} row {i + 1}").conversation(), data)
                 for i, r in enumerate(rows)]
        return Plan(str(adapter), base, s, data, convs, s.data)
    if s.data:
        data = dataclasses.replace(cfg.data) if cfg is not None else DataConfig()
        data.card, data.path, data.val_path, data.val_fraction = None, s.data, None, 0.0
        data.format = s.format or (cfg.data.format if cfg is not None else None)
        data.data_files, data.max_rows = None, None
        if not data.format:
            raise UsageError(f"fidelity.format is needed for fidelity.data={s.data} (the adapter records no data.format)")
        split, seed, source = "all", 0, s.data
    elif cfg is not None:
        data, split, seed = dataclasses.replace(cfg.data), "val", cfg.train.seed
        source = f"the recipe's validation rows ({data.card or data.path})"
        if data.val_fraction <= 0 and not data.val_path:  # nothing was held out: say so, do not pretend
            data.val_fraction = DataConfig.val_fraction
            source = (f"rows of the training data ({data.card or data.path}; the recipe holds none out: "
                      "give fidelity.data= for held-out ones)")
    else:
        why = f"{adapter} records no training run (config.yaml); give fidelity.data=FILE"
        if gate:
            raise UsageError(f"fidelity.min_agreement needs held-out rows: {why}")
        empty.skip = why
        return empty
    data.cache, data.strict, data.chat_template = False, False, None  # the adapter's tokenizer has the template
    if data.sources and not s.data:  # several sources: each one's validation rows, taken in turn
        per = [load_conversations(source_config(data, src), seed=seed, split=split)[0] for src in data.sources]
        convs = [c for group in itertools.zip_longest(*per) for c in group if c is not None]
        source = f"the recipe's validation rows ({len(per)} data.sources)"
    else:
        convs, _ = load_conversations(data, seed=seed, split=split)
    return Plan(str(adapter), base, s, data, list(convs)[: s.n], source)


def _pass(model, tok, plan: Plan, keep: Optional[list] = None):
    """Per row: (scored positions' log-probs [T, V] on CPU, targets) and greedy continuations."""
    device = next(model.parameters()).device
    out = []
    for conv in plan.rows:
        ids, labels = tokenize_conversation(conv, tok, plan.data_cfg)
        ids, labels = list(ids)[:MAX_TOKENS], list(labels)[:MAX_TOKENS]
        target = torch.tensor(labels[1:])
        scored = target != -100
        if not scored.any():  # a plain text row: every next token counts
            target, scored = torch.tensor(ids[1:]), torch.ones(len(ids) - 1, dtype=torch.bool)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, :-1]
        out.append((torch.log_softmax(logits.float(), -1).cpu()[scored], target[scored]))
    prompts, where = [], []
    for i, conv in enumerate(plan.rows):
        msgs = list(conv.messages)
        if msgs and msgs[-1]["role"] == "assistant":
            prompts.append(render_prompt(type(conv)(messages=msgs[:-1], system=conv.system, tools=conv.tools),
                                         tok, plan.data_cfg))
            where.append(i)
    spec = GenerationSpec(max_new_tokens=plan.settings.max_new_tokens, batch_size=4)
    texts = generate(model, tok, prompts, spec, show=False) if prompts else []
    return out, dict(zip(where, texts)), prompts


def _release(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(plan: Plan, candidate_dir, candidate_name: Optional[str] = None, label: str = "merged",
            gguf: Optional[Path] = None) -> dict:
    """Compare `candidate_dir` (a plain model dir), or the `gguf` file as transformers dequantizes
    it, with the adapter as trained; fidelity.json's content."""
    device = inference_device(plan.settings.device)
    dtype = inference_dtype(device)
    ref_model, tok = load_as_trained(plan.adapter, device, dtype, base=plan.base)
    ref, ref_text, prompts = _pass(ref_model, tok, plan)
    _release(ref_model)
    if gguf is not None:
        cand_model = load_gguf(gguf, dtype, device)
    else:
        cand_model, _ = load_for_inference(str(candidate_dir), dtype=dtype, device=device)
    cand, cand_text, _ = _pass(cand_model.eval(), tok, plan)
    _release(cand_model)

    agree = kl = nll_r = nll_c = 0.0
    count = 0
    for (lr, t), (lc, _) in zip(ref, cand):
        if lr.shape[-1] != lc.shape[-1]:  # a resized vocabulary: compare the shared part
            v = min(lr.shape[-1], lc.shape[-1])
            lr, lc = lr[:, :v], lc[:, :v]
        agree += float((lr.argmax(-1) == lc.argmax(-1)).sum())
        kl += float((lr.exp() * (lr - lc)).sum())
        nll_r -= float(lr.gather(1, t[:, None]).sum())
        nll_c -= float(lc.gather(1, t[:, None]).sum())
        count += len(t)
    count = max(count, 1)
    side = [{"prompt": tok.decode(p, skip_special_tokens=False), "reference": ref_text[i], label: cand_text[i],
             "equal": ref_text[i] == cand_text[i]} for i, p in zip(sorted(ref_text), prompts)]
    quant = run_config(plan.adapter)
    return {
        "reference": f"{plan.adapter} on its base"
                     + (f" ({quant.quant.mode}, as trained)" if quant is not None and quant.quant.mode != "none" else ""),
        "candidate": candidate_name or str(candidate_dir),
        "rows": len(plan.rows), "data": plan.source, "tokens": count, "device": device, "dtype": str(dtype),
        "top1_agreement": agree / count, "mean_kl": max(kl / count, 0.0),  # float error can dip below 0
        "perplexity": {"reference": math.exp(nll_r / count), label: math.exp(nll_c / count)},
        "greedy_equal": sum(s["equal"] for s in side), "greedy_total": len(side),
        "continuations": side,
    }


def summary(report: dict, label: str = "merged") -> str:
    ppl = report["perplexity"]
    rows = "held-out rows" if "training data" not in report["data"] else "training rows"
    return (f"fidelity ({label} vs adapter as trained, {report['rows']} {rows}, {report['tokens']} tokens): "
            f"top-1 agreement {100 * report['top1_agreement']:.1f}%, mean KL {report['mean_kl']:.2g}, "
            f"perplexity {ppl[label]:.3g} vs {ppl['reference']:.3g}, "
            f"greedy continuations equal {report['greedy_equal']}/{report['greedy_total']}")


def write_report(report: dict, directory, settings: FidelitySettings) -> dict:
    """Add the gate's verdict (passed: null without a gate) and write fidelity.json into `directory`
    (None: the caller writes it, as export does inside its output)."""
    gate = settings.min_agreement
    report["min_agreement"] = gate
    report["passed"] = None if gate is None else report["top1_agreement"] >= gate
    if directory is not None:
        atomic_write(Path(directory) / REPORT, json.dumps(report, indent=1) + "\n")
    return report


def apply_gate(report: dict, out_dir) -> None:
    """Below fidelity.min_agreement: rename the output OUT.fidelity-failed and fail in one line."""
    if report.get("passed") is not False:
        return
    failed = failed_name(out_dir)
    os.replace(Path(os.path.expanduser(str(out_dir))), failed)
    raise FinetuneError(f"fidelity gate: top-1 agreement {100 * report['top1_agreement']:.1f}% is below "
                        f"fidelity.min_agreement={report['min_agreement']}; the output is kept as {failed} "
                        f"(see its {REPORT})")
