"""Eval suites: YAML files in eval/ that say which data, which metrics, how to generate.

    name: demo
    description: held-out prompts for the demo dataset
    tasks:
      - name: qa
        data: data/demo.jsonl        # a file relative to this YAML, or a dataset card name
        format: eval                 # eval (our held-out rows) or any training format (alpaca, ...)
        split: train
        n: 50                        # first n rows (or last n with select: tail)
        rows: heldout                # training formats: the val rows training held out (or all)
        metrics: [exact_match, contains, rouge_l, chrf, loss]
        generation: {max_new_tokens: 32, batch_size: 8, stop: ["\\n\\n"]}
        system_prompt: null          # prompt rendering options, as in a recipe's data section
      - lm_eval: arc_easy            # an lm-evaluation-harness task name or a local task YAML

Held-out rows in the `eval` format: {"messages": [...], "answer": str, "aliases": [...],
"keywords": [...]} for generation, or {"messages"|"prompt", "choices": [...], "answer": index}
for multiple choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from finetune.errors import UsageError, did_you_mean
from finetune.eval.metrics import check_metric
from finetune.ranges import check_fields, ranged
from finetune.resources import find_resource, list_resources, read_yaml_mapping

TASK_KEYS = ("name", "data", "format", "split", "subset", "rows", "n", "select", "metrics", "generation",
             "system_prompt", "prompt_style", "seq_len", "batch_size", "lm_eval", "num_fewshot", "limit")
GEN_KEYS = ("max_new_tokens", "batch_size", "do_sample", "temperature", "top_p", "stop", "seed")
SUITE_KEYS = ("name", "description", "tasks")


@dataclass
class GenerationSpec:
    max_new_tokens: int = ranged(64, ge=1)
    batch_size: int = ranged(8, ge=1)
    do_sample: bool = False
    temperature: float = ranged(1.0, ge=0)
    top_p: float = ranged(1.0, gt=0, le=1)
    stop: list[str] = field(default_factory=list)
    """Strings that end an answer early (the text is cut at the first one)."""
    seed: int = ranged(0, ge=0, le=2**32 - 1)


@dataclass
class TaskSpec:
    name: str
    data: Optional[str] = None
    data_path: Optional[Path] = None
    """`data` resolved to a file when it is one; None means `data` is a dataset card."""
    format: str = "eval"
    split: str = "train"
    subset: Optional[str] = None
    rows: str = "heldout"
    """Training-format data only: heldout = the validation rows training sets aside (same seed and
    val_fraction as the recipe), all = every row."""
    n: Optional[int] = ranged(None, ge=1)
    select: str = "head"
    metrics: list[str] = field(default_factory=list)
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    system_prompt: Optional[str] = None
    prompt_style: Optional[str] = None
    seq_len: int = ranged(1024, ge=8)
    batch_size: int = ranged(8, ge=1)
    lm_eval: Optional[str] = None
    num_fewshot: Optional[int] = ranged(None, ge=0)


@dataclass
class Suite:
    name: str
    description: str
    path: Path
    tasks: list[TaskSpec]


@dataclass
class Example:
    """One held-out row, whatever file it came from."""

    messages: list[dict]
    """The prompt: every turn before the answer (system/user/earlier assistant turns)."""
    answer: Optional[str] = None
    aliases: list[str] = field(default_factory=list)
    keywords: list[str] = field(default_factory=list)
    choices: Optional[list[str]] = None
    answer_index: Optional[int] = None
    id: Any = None

    def conversation(self) -> list[dict]:
        """Prompt + reference answer: the sequence whose answer tokens the loss is measured on."""
        return [*self.messages, {"role": "assistant", "content": self.answer or ""}]


def load_suite(name: str, data: Optional[str] = None, n: Optional[int] = None,
               max_new_tokens: Optional[int] = None) -> Suite:
    """Read and validate a suite; `data`, `n` and `max_new_tokens` override every task's."""
    try:
        path = find_resource("eval", str(name))
    except UsageError as e:
        if "unknown" in str(e):
            raise UsageError(f"unknown eval suite '{name}'{did_you_mean(str(name), list_resources('eval'))}; "
                             f"known: {', '.join(list_resources('eval'))}") from None
        raise
    raw = read_yaml_mapping(path, "eval suite")
    where = f"eval suite {path}"
    for key in raw:
        if key not in SUITE_KEYS:
            raise UsageError(f"{where}: unknown key '{key}'{did_you_mean(key, SUITE_KEYS)}")
    tasks_raw = raw.get("tasks")
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise UsageError(f"{where}: 'tasks' must be a non-empty list")
    tasks = [_parse_task(t, i, path, where) for i, t in enumerate(tasks_raw)]
    names = [t.name for t in tasks]
    dup = next((x for x in names if names.count(x) > 1), None)
    if dup:
        raise UsageError(f"{where}: two tasks are named '{dup}'; give each a distinct name")
    for t in tasks:
        if t.lm_eval:
            if n is not None:
                t.n = n
            continue
        if data is not None:
            t.data, t.data_path = data, _as_file(data, Path.cwd())
            if t.data_path is None and not _is_card(data):
                raise UsageError(f"data={data}: no such file, and no dataset card of that name")
        if n is not None:
            t.n = n
        if max_new_tokens is not None:
            t.generation.max_new_tokens = max_new_tokens
    return Suite(name=str(raw.get("name") or path.stem), description=str(raw.get("description") or ""),
                 path=path, tasks=tasks)


def _parse_task(t: Any, i: int, suite_path: Path, where: str) -> TaskSpec:
    if isinstance(t, str):
        t = {"lm_eval": t}
    if not isinstance(t, dict):
        raise UsageError(f"{where}: task {i + 1} must be a mapping, got {type(t).__name__}")
    for key in t:
        if key not in TASK_KEYS:
            raise UsageError(f"{where}: task {i + 1}: unknown key '{key}'{did_you_mean(key, TASK_KEYS)}")
    gen = t.get("generation") or {}
    if not isinstance(gen, dict):
        raise UsageError(f"{where}: task {i + 1}: generation must be a mapping")
    for key in gen:
        if key not in GEN_KEYS:
            raise UsageError(f"{where}: task {i + 1}: unknown generation key '{key}'{did_you_mean(key, GEN_KEYS)}")
    if isinstance(gen.get("stop"), str):
        gen["stop"] = [gen["stop"]]
    try:
        spec = TaskSpec(name=str(t.get("name") or ""), generation=GenerationSpec(**gen),
                        **{k: t[k] for k in ("data", "format", "split", "subset", "rows", "n", "select", "system_prompt",
                                             "prompt_style", "seq_len", "batch_size", "lm_eval", "num_fewshot")
                           if k in t and t[k] is not None})
    except TypeError as e:
        raise UsageError(f"{where}: task {i + 1}: {e}") from None
    if "limit" in t and t["limit"] is not None:
        spec.n = t["limit"]
    check_fields(spec, f"{where}: task {i + 1}")  # types and ranges: YAML gives strings, 0, booleans
    if spec.lm_eval:
        spec.lm_eval = str(spec.lm_eval)
        local = _as_file(spec.lm_eval, suite_path.parent)
        if local is not None:
            spec.lm_eval = str(local)
        elif spec.lm_eval.endswith((".yaml", ".yml")):
            raise UsageError(f"{where}: task {i + 1}: lm_eval task file not found: {spec.lm_eval}")
        spec.name = spec.name or Path(spec.lm_eval).stem
        spec.metrics = []
        return spec
    if not spec.name:
        spec.name = f"task{i + 1}"
    metrics = t.get("metrics")
    if not isinstance(metrics, list) or not metrics:
        raise UsageError(f"{where}: task '{spec.name}': 'metrics' must be a non-empty list")
    spec.metrics = [check_metric(str(m), f"{where}: task '{spec.name}'") for m in metrics]
    if not spec.data:
        raise UsageError(f"{where}: task '{spec.name}': 'data' is required (a file or a dataset card)")
    spec.data = str(spec.data)
    spec.data_path = _as_file(spec.data, suite_path.parent)
    if spec.data_path is None and not _is_card(spec.data):
        raise UsageError(f"{where}: task '{spec.name}': data '{spec.data}' is neither a file (relative to the "
                         f"suite) nor a dataset card{did_you_mean(spec.data, list_resources('datasets'))}")
    if spec.select not in ("head", "tail"):
        raise UsageError(f"{where}: task '{spec.name}': select must be head or tail, got '{spec.select}'")
    if spec.rows not in ("heldout", "all"):
        raise UsageError(f"{where}: task '{spec.name}': rows must be heldout or all, got '{spec.rows}'")
    if spec.format != "eval" and "choice" in spec.metrics:
        raise UsageError(f"{where}: task '{spec.name}': metric 'choice' needs format: eval rows with 'choices'")
    return spec


def _as_file(ref: str, base: Path) -> Optional[Path]:
    p = Path(ref).expanduser()
    for cand in ((p,) if p.is_absolute() else (base / p, Path.cwd() / p)):
        if cand.exists():
            return cand.resolve()
    return None


def _is_card(name: str) -> bool:
    return name in list_resources("datasets") or (name.endswith((".yaml", ".yml")) and Path(name).is_file())


# --------------------------------------------------------------------------- rows


def example_from_row(row: Any, where: str) -> Example:
    """An `eval`-format row -> Example."""
    if not isinstance(row, dict):
        raise UsageError(f"{where}: expected a JSON object, got {type(row).__name__}")
    messages = row.get("messages")
    if messages is None and "prompt" in row:
        messages = [{"role": "user", "content": str(row["prompt"])}]
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise UsageError(f"{where}: 'messages' must be a non-empty list of {{role, content}} (or give 'prompt')")
    if messages[-1]["role"] == "assistant" and "answer" not in row:
        # A full conversation: its last assistant turn is the reference.
        return Example(messages=messages[:-1], answer=str(messages[-1]["content"]), id=row.get("id"))
    if "choices" in row:
        choices, ans = row["choices"], row.get("answer")
        if not isinstance(choices, list) or len(choices) < 2:
            raise UsageError(f"{where}: 'choices' must list at least two options")
        if isinstance(ans, str) and ans in choices:
            ans = choices.index(ans)
        if not isinstance(ans, int) or not 0 <= ans < len(choices):
            raise UsageError(f"{where}: 'answer' must be the index of the right choice (0..{len(choices) - 1})")
        return Example(messages=messages, answer=str(choices[ans]), choices=[str(c) for c in choices],
                       answer_index=ans, id=row.get("id"))
    if "answer" not in row:
        raise UsageError(f"{where}: missing 'answer'")
    listify = lambda v: [str(x) for x in v] if isinstance(v, list) else ([str(v)] if v else [])
    return Example(messages=messages, answer=str(row["answer"]), aliases=listify(row.get("aliases")),
                   keywords=listify(row.get("keywords")), id=row.get("id"))


def select_rows(rows: list, task: TaskSpec) -> list:
    if task.n is None or task.n >= len(rows):
        return rows
    return rows[-task.n:] if task.select == "tail" else rows[:task.n]
