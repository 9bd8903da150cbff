"""Score base models, adapters, merged and MoE checkpoints on one suite: `finetune eval`, and
the recipe's suite after training (`run_suite_after_training`).

Models are evaluated one at a time (only one is in memory); each runs every task of the suite.
Adapters on one base share one load of it (finetune.eval.checkpoints.Loader). Off a terminal
(SLURM, a pipe) progress is plain lines: rows done, rows/s, ETA per task.
Writes out_dir/scores.json, scores.md, scores.png and generations/<model>.jsonl.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Optional

from finetune.config import Config, DataConfig
from finetune.errors import FinetuneError, UsageError, first_line
from finetune.eval import generate as G
from finetune.eval.checkpoints import Loader, check_adapters_fit, eval_order, resolve_checkpoints
from finetune.eval.lm_eval_bridge import require_lm_eval, run_lm_eval_task
from finetune.eval.metrics import GENERATION_METRICS, perplexity, score_generations
from finetune.eval.prompting import (
    load_examples,
    loss_ids,
    prompt_ids,
    task_data_config,
)
from finetune.eval.scorecard import build_scorecard, write_scorecard
from finetune.eval.suites import load_suite
from finetune.fs import atomic_write, check_apart, out_dir_lock, write_error
from finetune.manifest import check_input
from finetune.progress import doing
from finetune.runtime import inference_device, inference_dtype


def run_suite_after_training(suite: str, adapter_dir, out_dir, cfg: Optional[Config] = None) -> dict:
    """Score base vs the freshly trained adapter (the recipe's eval.suite) into out_dir.

    Prompts are rendered with the recipe's data settings; eval.max_new_tokens sets the length.
    A scorecard already in out_dir is replaced: it scored an adapter that this run has just replaced
    (a run with overwrite=true or resume into the same out_dir would otherwise fail at the very end).
    """
    return evaluate(suite, ["base", str(adapter_dir)], out_dir, overwrite=True,
                    data_cfg=cfg.data if cfg is not None else None,
                    max_new_tokens=cfg.eval.max_new_tokens if cfg is not None else None,
                    device="cpu" if cfg is not None and cfg.accelerator == "cpu" else "auto",
                    seed=cfg.train.seed if cfg is not None else 42)


def evaluate(suite_name: str, models: list[str], out_dir, *, data_cfg: Optional[DataConfig] = None,
             base_model: Optional[str] = None, base: Optional[str] = None, data: Optional[str] = None,
             n: Optional[int] = None,
             max_new_tokens: Optional[int] = None, batch_size: Optional[int] = None, device: str = "auto",
             dtype: str = "auto", overwrite: bool = False, show: bool = True, seed: int = 42) -> dict:
    """Run a suite on several checkpoints and write the scorecard; returns scores.json's content."""
    suite = load_suite(suite_name, data=data, n=n, max_new_tokens=max_new_tokens)
    if batch_size is not None:
        for t in suite.tasks:
            t.batch_size = t.generation.batch_size = batch_size
    check_apart(out_dir, [("model", m) for m in models] + [("data file", data), ("base model", base_model)])
    ckpts = resolve_checkpoints(list(models), base_model, base=base)
    check_apart(out_dir, [("model", str(c.path)) for c in ckpts])
    for c in ckpts:
        check_input(c.path, c.kind)
    check_adapters_fit(ckpts)
    out = Path(out_dir).expanduser()
    # Not finetune.fs.check_out_dir: eval's out_dir (a run's eval/, say) may hold other files;
    # only an existing scorecard is protected.
    if out.exists() and not out.is_dir():
        raise UsageError(f"out_dir {out_dir} exists and is not a directory; eval writes a folder "
                         "(scores.json, scores.md, scores.png, generations/)")
    if (out / "scores.json").exists() and not overwrite:
        raise UsageError(f"{out} already holds a scorecard; pick another out_dir or pass overwrite=true")
    with out_dir_lock(out):  # one writer per out_dir, as training
        return _evaluate(suite, ckpts, out, data_cfg, device, dtype, show, seed)


def _evaluate(suite, ckpts, out: Path, data_cfg, device: str, dtype: str, show: bool, seed: int) -> dict:
    device = inference_device(device)
    torch_dtype = inference_dtype(device, dtype)
    if any(t.lm_eval for t in suite.tasks):
        require_lm_eval()

    # Data is read once, before any model loads: a bad file fails fast.
    task_cfgs = {t.name: task_data_config(t, data_cfg) for t in suite.tasks if not t.lm_eval}
    examples = {t.name: load_examples(t, task_cfgs[t.name], seed) for t in suite.tasks if not t.lm_eval}
    tasks_info = {t.name: {"n": len(examples[t.name]) if t.name in examples else t.n,
                           "data": t.lm_eval or str(t.data_path or t.data), "metrics": t.metrics}
                  for t in suite.tasks}

    gen_dir = out / "generations"
    scores: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    loader = Loader(device, torch_dtype)
    for i, ck in enumerate(eval_order(ckpts)):  # scores.* keep the order given; loading in this one loads each base once
        with doing(f"evaluating {ck.name} ({i + 1} of {len(ckpts)}) on suite {suite.name}",
                   (f"the generations of the {i} model(s) done are in {gen_dir}; " if i else "")
                   + f"no scorecard was written to {out}; run the same command again"):
            _evaluate_one(ck, i, suite, examples, task_cfgs, loader, device, show, gen_dir, scores, timings)
    loader.release()
    scores = {c.name: scores[c.name] for c in ckpts}
    timings = {c.name: timings[c.name] for c in ckpts}

    card = build_scorecard(suite, [c.to_dict() for c in ckpts], scores, tasks_info)
    card["seconds"] = timings
    card["device"], card["dtype"] = device, str(torch_dtype).replace("torch.", "")
    with write_error(out):
        paths = write_scorecard(card, out, show=show)
    if show:
        print(f"[eval] wrote {paths['json']}, {paths['md'].name}, {paths['png'].name}"
              + (f" and {gen_dir}/" if gen_dir.exists() else ""), flush=True)
    return card


def _evaluate_one(ck, i: int, suite, examples, task_cfgs, loader, device: str, show: bool, gen_dir: Path,
                  scores: dict, timings: dict) -> None:
    """Load one checkpoint, run every task of the suite on it, write its generations."""
    t0 = time.perf_counter()
    if show:
        how = f"adapter {ck.path} on the base already loaded" if loader.reuses_base(ck) else f"{ck.kind} {ck.path}"
        print(f"[eval] {ck.name}: loading {how}", flush=True)
    model, tok = _load(loader, ck)
    scores[ck.name] = {}
    records: list[dict] = []
    for task in suite.tasks:
        if task.lm_eval:
            res = run_lm_eval_task(model, tok, task, device=device, show=show)
            scores[ck.name].update({f"{task.name}/{k}": v for k, v in res.items()})
            continue
        s, recs = score_task(model, tok, task, examples[task.name], task_cfgs[task.name], show=show)
        scores[ck.name].update({f"{task.name}/{k}": v for k, v in s.items()})
        records += recs
    if records:
        with write_error(gen_dir):
            atomic_write(gen_dir / f"{_file_name(ck.name)}.jsonl",
                         "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    timings[ck.name] = round(time.perf_counter() - t0, 2)
    del model


def score_task(model, tok, task, examples, data_cfg, show: bool = True) -> tuple[dict, list[dict]]:
    """One task on one loaded model: aggregate scores and per-example records."""
    scores: dict[str, float] = {}
    records = [{"task": task.name, "index": i, "id": ex.id, "prompt": ex.messages[-1]["content"] if ex.messages else "",
                "answer": ex.answer} for i, ex in enumerate(examples)]
    records = [{k: v for k, v in r.items() if v is not None} for r in records]
    if any(m in task.metrics for m in ("loss", "perplexity")):
        seqs = [loss_ids(ex, tok, data_cfg) for ex in examples]
        nll = G.sequence_nll(model, seqs, G.pad_id_of(tok), task.batch_size, desc=f"{task.name} loss", show=show)
        total, count = sum(s for s, _ in nll), sum(c for _, c in nll)
        if count == 0:
            raise FinetuneError(f"task '{task.name}': no answer tokens to measure loss on (all truncated?)")
        mean = total / count  # token-weighted, as in training
        if "loss" in task.metrics:
            scores["loss"] = mean
        if "perplexity" in task.metrics:
            scores["perplexity"] = perplexity(mean)
        for r, (s, c) in zip(records, nll):
            r["loss"] = round(s / c, 5) if c else None
    prompts = None
    gen_metrics = [m for m in task.metrics if m in GENERATION_METRICS]
    if gen_metrics:
        prompts = [prompt_ids(ex, tok, data_cfg) for ex in examples]
        outs = G.generate(model, tok, prompts, task.generation, desc=f"{task.name} generate", show=show)
        agg, per = score_generations(gen_metrics, outs, examples)
        scores.update(agg)
        for r, o, p in zip(records, outs, per):
            r["output"] = o
            r.update(p)
    if "choice" in task.metrics:
        mc = [(i, ex) for i, ex in enumerate(examples) if ex.choices]
        if not mc:
            raise UsageError(f"task '{task.name}': metric 'choice' needs rows with 'choices'")
        prompts_mc = [prompt_ids(ex, tok, data_cfg) for _, ex in mc]
        lps = G.choice_logprobs(model, tok, prompts_mc, [ex.choices for _, ex in mc], task.batch_size, show=show,
                                desc=f"{task.name} choices")
        right = 0
        for (i, ex), lp in zip(mc, lps):
            pred = max(range(len(lp)), key=lambda k: lp[k])
            right += pred == ex.answer_index
            records[i].update(choice_logprobs=[round(x, 4) for x in lp], choice_pred=pred,
                              choice_correct=pred == ex.answer_index)
        scores["choice"] = 100.0 * right / len(mc)
    for k, v in scores.items():
        if isinstance(v, float) and math.isnan(v):
            raise FinetuneError(f"task '{task.name}': {k} is NaN (the model produced NaN logits)")
    return scores, records


def _load(loader: Loader, ck):
    try:
        return loader.load(ck)
    except FinetuneError:
        raise
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load checkpoint {ck.name} ({ck.path}): {first_line(e)}") from None


def _file_name(name: str) -> str:
    return re.sub(r"[^\w.\-]+", "_", name).strip("_") or "model"
