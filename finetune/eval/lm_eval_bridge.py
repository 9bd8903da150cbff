"""Run lm-evaluation-harness tasks on a model we already loaded (optional extra: `lm-eval`).

A suite task `{lm_eval: hellaswag}` names a harness task; `{lm_eval: tasks/my_task.yaml}` is a
local task file (relative to the suite), which runs offline when its dataset is local, e.g.

    task: tiny_mc
    dataset_path: json
    dataset_kwargs: {data_files: {test: data/tiny-mc.jsonl}}   # relative to this YAML
    test_split: test
    output_type: multiple_choice
    ...

The harness gets our model object (base, adapter or merged, already on its device) through its
HFLM wrapper, so `base` and every adapter are scored by the same code path as the other tasks.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Optional

import yaml

from finetune.errors import FinetuneError, UsageError, did_you_mean
from finetune.resources import install_hint


def require_lm_eval():
    # lm-eval is an optional extra (and a slow import): only suites with lm_eval tasks need it.
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UsageError("this suite has lm_eval tasks, which need lm-evaluation-harness: "
                         + install_hint("lm-eval")) from None


def _local_task(path: Path, tmp: Path) -> tuple[str, Path]:
    """(task name, folder to include) for a local task YAML; relative data_files become absolute."""
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        # Harness-specific tags (!function): leave the file as it is, in its own folder.
        cfg = None
        for line in path.read_text().splitlines():
            if line.startswith("task:"):
                return line.split(":", 1)[1].strip().strip("'\""), path.parent
        raise UsageError(f"lm_eval task file {path} has no top-level 'task:' name") from None
    if not isinstance(cfg, dict) or not cfg.get("task"):
        raise UsageError(f"lm_eval task file {path} has no top-level 'task:' name")
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files:
        def absolute(f):
            p = Path(f)
            return str(p if p.is_absolute() else (path.parent / p).resolve())
        if isinstance(files, dict):
            cfg["dataset_kwargs"]["data_files"] = {k: ([absolute(x) for x in v] if isinstance(v, list) else absolute(v))
                                                   for k, v in files.items()}
        elif isinstance(files, list):
            cfg["dataset_kwargs"]["data_files"] = [absolute(x) for x in files]
        else:
            cfg["dataset_kwargs"]["data_files"] = absolute(files)
    (tmp / path.name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(cfg["task"]), tmp


def run_lm_eval_task(model, tokenizer, task, device: str, show: bool = True) -> tuple[dict[str, float], Optional[int]]:
    """Scores of one harness task ({metric: value}, stderr columns dropped, fractions as 0-100) and
    the few-shot count it ran with. `prompt: chat` runs it under the tokenizer's chat template
    with the task's system prompt (the harness's apply_chat_template / system_instruction)."""
    require_lm_eval()
    import lm_eval  # the optional extra, present now (require_lm_eval)
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="finetune-lmeval-") as tmp:
        ref = Path(task.lm_eval)
        if ref.suffix in (".yaml", ".yml") and ref.is_file():
            name, include = _local_task(ref, Path(tmp))
            manager = TaskManager(include_path=str(include), include_defaults=False)
        else:
            name, manager = task.lm_eval, TaskManager()
        if name not in manager.all_tasks:
            raise UsageError(f"unknown lm_eval task '{name}'{did_you_mean(name, manager.all_tasks)}")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=task.batch_size, device=device)
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=[name], num_fewshot=task.num_fewshot, limit=task.n,
                                          task_manager=manager, log_samples=False, bootstrap_iters=0,
                                          verbosity="ERROR", **_convention_kwargs(task))
        except (FileNotFoundError, ConnectionError) as e:
            raise FinetuneError(f"lm_eval task '{name}' could not load its data ({e}); offline, use a local task YAML") from None
    results = (out or {}).get("results", {}).get(name, {})
    # The task's declared metrics; the results also hold bookkeeping such as sample_len.
    declared = set((out or {}).get("higher_is_better", {}).get(name, {}) or ())
    scores = {}
    for key, v in results.items():
        metric, _, _filter = key.partition(",")
        if "stderr" in metric or not isinstance(v, (int, float)) or isinstance(v, bool) or metric == "alias":
            continue
        if (declared and metric not in declared) or metric == "sample_len":
            continue
        v = float(v)
        # Harness accuracies are fractions; the scorecard's generation metrics are 0-100.
        if metric.startswith(("acc", "exact_match", "f1", "mcc")) and not math.isnan(v) and 0 <= v <= 1:
            v *= 100.0
        scores[metric if _filter in ("", "none") else f"{metric}[{_filter}]"] = v
    shots = ((out or {}).get("n-shot") or {}).get(name)
    return scores, int(shots) if isinstance(shots, int) else None


def _convention_kwargs(task) -> dict:
    """simple_evaluate's keys for the task's prompt convention (plain is the harness's default)."""
    out = {"system_instruction": task.system_prompt} if task.system_prompt is not None else {}
    return {**out, "apply_chat_template": True} if task.prompt == "chat" else out
