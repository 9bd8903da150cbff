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
from finetune.eval import conventions as C
from finetune.eval import generate as G
from finetune.eval import loglik as L
from finetune.eval import preference as P
from finetune.eval.checkpoints import Checkpoint, Loader, check_adapters_fit, eval_order, resolve_checkpoints
from finetune.eval.lm_eval_bridge import require_lm_eval, run_lm_eval_task
from finetune.eval.metrics import (
    CHOICE_METRICS,
    GENERATION_METRICS,
    LOSS_METRICS,
    ROLLING_METRICS,
    score_generations,
)
from finetune.eval.prompting import load_examples, prompt_ids, task_data_config
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
             dtype: str = "auto", overwrite: bool = False, show: bool = True, seed: int = 42,
             recipe_model: Optional[str] = None, reference: Optional[str] = None) -> dict:
    """Run a suite on several checkpoints and write the scorecard; returns scores.json's content.
    `recipe_model` (a recipe's model.name) is the `base` column when no adapter names a base;
    `reference` replaces every preference task's reference (base or an adapter dir)."""
    suite = load_suite(suite_name, data=data, n=n, max_new_tokens=max_new_tokens)
    for t in suite.tasks:
        if reference is not None and t.format == "preference":
            t.reference = reference
    if batch_size is not None:
        for t in suite.tasks:
            t.batch_size = t.generation.batch_size = batch_size
    check_apart(out_dir, [("model", m) for m in models] + [("data file", data), ("base model", base_model)])
    ckpts = resolve_checkpoints(list(models), base_model, base=base, recipe_model=recipe_model)
    check_apart(out_dir, [("model", str(c.path)) for c in ckpts])
    refs = reference_checkpoints(suite.tasks, base)
    for c in ckpts + refs:
        check_input(c.path, c.kind)
    check_adapters_fit(ckpts + refs)
    out = Path(out_dir).expanduser()
    # Not finetune.fs.check_out_dir: eval's out_dir (a run's eval/, say) may hold other files;
    # only an existing scorecard is protected.
    if out.exists() and not out.is_dir():
        raise UsageError(f"out_dir {out_dir} exists and is not a directory; eval writes a folder "
                         "(scores.json, scores.md, scores.png, generations/)")
    if (out / "scores.json").exists() and not overwrite:
        raise UsageError(f"{out} already holds a scorecard; pick another out_dir or pass overwrite=true")
    with out_dir_lock(out):  # one writer per out_dir, as training
        return _evaluate(suite, ckpts, refs, run_base(ckpts, base_model, recipe_model), out, data_cfg,
                         device, dtype, show, seed)


def _evaluate(suite, ckpts, refs, run_base_path: Optional[str], out: Path, data_cfg, device: str, dtype: str,
              show: bool, seed: int) -> dict:
    device = inference_device(device)
    torch_dtype = inference_dtype(device, dtype)
    if any(t.lm_eval for t in suite.tasks):
        require_lm_eval()

    # Data is read once, before any model loads: a bad file fails fast.
    task_cfgs = {t.name: task_data_config(t, data_cfg) for t in suite.tasks if not t.lm_eval}
    pairs = {t.name: P.load_pairs(t, task_cfgs[t.name]) for t in suite.tasks if t.format == "preference"}
    examples = {t.name: P.as_examples(pairs[t.name]) if t.name in pairs else load_examples(t, task_cfgs[t.name], seed)
                for t in suite.tasks if not t.lm_eval}
    prefs = P.PrefScoring(suite.tasks, run_base_path)
    for t in suite.tasks:
        if not t.lm_eval:
            L.check_rows(t, examples[t.name])
    tasks_info = {t.name: {"n": len(examples[t.name]) if t.name in examples else t.n,
                           "data": t.lm_eval or str(t.data_path or t.data), "metrics": t.metrics,
                           "convention": C.describe(t, task_cfgs.get(t.name))}
                  for t in suite.tasks}

    gen_dir = out / "generations"
    scores: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    loader = Loader(device, torch_dtype)
    for i, ck in enumerate(eval_order(ckpts)):  # scores.* keep the order given; loading in this one loads each base once
        with doing(f"evaluating {ck.name} ({i + 1} of {len(ckpts)}) on suite {suite.name}",
                   (f"the generations of the {i} model(s) done are in {gen_dir}; " if i else "")
                   + f"no scorecard was written to {out}; run the same command again"):
            _evaluate_one(ck, suite, examples, task_cfgs, tasks_info, pairs, prefs, loader, device, show, gen_dir,
                          scores, timings)
    for key, names in prefs.missing_references().items():  # a reference no column gave: one more load
        ck = next((r for r in refs if r.path == key), None) or Checkpoint("reference", key, "base")
        if show:
            print(f"[eval] reference for {', '.join(names)}: loading {ck.kind} {ck.path}", flush=True)
        model, tok = _load(loader, ck)
        for name in names:
            task = prefs.tasks[name]
            prefs.add_reference(name, model, tok, P.pair_ids(tok, task, pairs[name], task_cfgs[name]), show)
        del model
    loader.release()
    prefs.fill(scores, [c.name for c in ckpts])
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


def run_base(ckpts, base_model: Optional[str], recipe_model: Optional[str]) -> Optional[str]:
    """The base model of this run (what `reference: base` means), or None when nothing names one."""
    for c in ckpts:
        if c.kind == "base":
            return c.path
    adapter = next((c for c in ckpts if c.kind == "adapter"), None)
    if adapter is not None:
        return adapter.base
    named = base_model or recipe_model
    return resolve_checkpoints(["base"], named)[0].path if named else None


def reference_checkpoints(tasks, base: Optional[str]) -> list[Checkpoint]:
    """The reference adapters preference tasks name, checked before anything loads."""
    out: list[Checkpoint] = []
    for t in tasks:
        if t.format != "preference" or t.reference == "base" or not P.needs_reference(t):
            continue
        p = Path(t.reference).expanduser()
        if not (p / "adapter_config.json").is_file():
            raise UsageError(f"task '{t.name}': reference {t.reference} is not an adapter directory (no "
                             f"adapter_config.json); give base or the adapter the run started from")
        ck = resolve_checkpoints([str(p)], base=base)[0]
        if all(ck.path != r.path for r in out):
            out.append(ck)
    return out


def _evaluate_one(ck, suite, examples, task_cfgs, tasks_info, pairs, prefs, loader, device: str, show: bool,
                  gen_dir: Path, scores: dict, timings: dict) -> None:
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
            res, shots = run_lm_eval_task(model, tok, task, device=device, show=show)
            scores[ck.name].update({f"{task.name}/{k}": v for k, v in res.items()})
            if shots is not None:  # the harness's own default when the suite named none
                tasks_info[task.name]["convention"]["num_fewshot"] = shots
            continue
        if task.name in pairs:  # placeholders: preference scores need the reference, known at the end
            scores[ck.name].update({f"{task.name}/{m}": None for m in task.metrics})
        s, recs = score_task(model, tok, task, examples[task.name], task_cfgs[task.name], show=show)
        scores[ck.name].update({f"{task.name}/{k}": v for k, v in s.items()})
        if task.name in pairs:
            prefs.observe(ck, model, tok, task, P.pair_ids(tok, task, pairs[task.name], task_cfgs[task.name]),
                          recs, show)
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
    if any(m in LOSS_METRICS for m in task.metrics):
        scores.update(L.score_loss(model, tok, task, examples, data_cfg, records, show))
    gen_metrics = [m for m in task.metrics if m in GENERATION_METRICS]
    if gen_metrics:
        prompts = [_prompt_ids(ex, tok, task, data_cfg) for ex in examples]
        outs = G.generate(model, tok, prompts, task.generation, desc=f"{task.name} generate", show=show)
        agg, per = score_generations(gen_metrics, outs, examples)
        scores.update(agg)
        for r, o, p in zip(records, outs, per):
            r["output"] = o
            r.update(p)
    if any(m in CHOICE_METRICS for m in task.metrics):
        scores.update(L.score_choices(model, tok, task, examples, data_cfg, records, show))
    if any(m in ROLLING_METRICS for m in task.metrics):
        scores.update(L.score_rolling(model, tok, task, examples, records, show))
    for k, v in scores.items():
        if isinstance(v, float) and math.isnan(v):
            raise FinetuneError(f"task '{task.name}': {k} is NaN (the model produced NaN logits)")
    return scores, records


def _prompt_ids(example, tok, task, data_cfg) -> list[int]:
    """Generation prompt: the chat template's, or the plain prompt text (lm-eval's encoding)."""
    if task.prompt == "plain":
        return C.encode(tok, C.plain_prompt(task, example.messages))
    return prompt_ids(example, tok, data_cfg)


def _load(loader: Loader, ck):
    try:
        return loader.load(ck)
    except FinetuneError:
        raise
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load checkpoint {ck.name} ({ck.path}): {first_line(e)}") from None


def _file_name(name: str) -> str:
    return re.sub(r"[^\w.\-]+", "_", name).strip("_") or "model"
