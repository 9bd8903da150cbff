"""Eval suites: YAML files in eval/ that say which data, which metrics, how to generate.

    name: demo
    description: held-out prompts for the demo dataset
    prompt: chat                     # chat (the chat template, as training renders) or plain text
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
        prompt: plain                # this task's convention (default: the suite's)
      - lm_eval: arc_easy            # an lm-evaluation-harness task name or a local task YAML

Held-out rows in the `eval` format: {"messages": [...], "answer": str, "aliases": [...],
"keywords": [...]} for generation, {"messages"|"prompt", "choices": [...], "answer": index}
for multiple choice, or {"text": str} for the rolling perplexities of plain text. `format:
preference` reads held-out pairs in any preference format (finetune.eval.preference).

The prompt convention (finetune.eval.conventions): `chat` renders the prompt through the chat
template with the system prompt (the task's, else the recipe's), as training does; `plain` is
lm-evaluation-harness's default: the prompt text as it is, the answer after `target_delimiter`.
Our tasks default to chat, lm_eval tasks to plain (the harness's default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from finetune.data.formats import Format
from finetune.errors import UsageError, did_you_mean
from finetune.eval.metrics import CHOICE_METRICS, PREFERENCE_METRICS, ROLLING_METRICS, check_metric
from finetune.ranges import ranged
from finetune.resources import find_resource, list_resources, read_yaml_mapping
from finetune.typed import items, parse_mapping


@dataclass
class GenerationSpec:
    """A task's `generation:` mapping: how answers are generated for the text metrics."""

    max_new_tokens: int = ranged(64, ge=1)
    """Longest answer in tokens (finetune eval max_new_tokens=N overrides every task's)."""
    batch_size: int = ranged(8, ge=1)
    """Prompts generated for at once."""
    do_sample: bool = False
    """Sample instead of greedy decoding."""
    temperature: float = ranged(1.0, ge=0)
    """Sampling temperature (do_sample only)."""
    top_p: float = ranged(1.0, gt=0, le=1)
    """Nucleus sampling mass (do_sample only)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end an answer early (the text is cut at the first one); one string or a list."""
    seed: int = ranged(0, ge=0, le=2**32 - 1)
    """Sampling seed."""


@dataclass
class TaskSpec:
    """One item of a suite's `tasks:` list: our own task, or an lm-evaluation-harness one (`lm_eval`)."""

    name: str = ""
    """Task name, the scorecard's row prefix (default: task1, ... or the lm_eval task's name)."""
    data: Optional[str] = None
    """Rows: a file relative to the suite (or the working directory), or a dataset card name."""
    format: Literal["eval", "auto", "preference", Format] = "eval"
    """eval (held-out rows, see the module doc), preference (pairs in any preference format,
    finetune.eval.preference), a training format, or auto (the card's format)."""
    split: str = "train"
    """Split read from a dataset card's or folder's data (training formats)."""
    subset: Optional[str] = None
    """Hub dataset configuration (subset) name (training formats)."""
    rows: Literal["heldout", "all"] = "heldout"
    """Training-format data only: heldout = the validation rows training sets aside (same seed and
    val_fraction as the recipe), all = every row."""
    n: Optional[int] = ranged(None, ge=1)
    """Use at most this many rows (null = every row); `limit` is another name for it."""
    select: Literal["head", "tail"] = "head"
    """Which n rows: the first (head) or the last (tail)."""
    metrics: list[str] = field(default_factory=list)
    """Metrics to score (finetune.eval.metrics): e.g. loss, exact_match, contains, rouge_l, chrf, choice."""
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    system_prompt: Optional[str] = None
    """System prompt for conversations without one, as a recipe's data.system_prompt."""
    prompt_style: Optional[str] = None
    """Fallback prompt style, as a recipe's data.prompt_style."""
    seq_len: int = ranged(1024, ge=8)
    """Longest prompt + answer in tokens for the loss metrics."""
    batch_size: int = ranged(8, ge=1)
    """Rows per loss or choice batch."""
    lm_eval: Optional[str] = None
    """An lm-evaluation-harness task name or a task YAML (relative to the suite); the other keys
    but name, n, num_fewshot, prompt and system_prompt do not apply. A bare string item is the same."""
    num_fewshot: Optional[int] = ranged(None, ge=0)
    """lm_eval tasks: few-shot examples per prompt (default: the task's own)."""
    prompt: Optional[Literal["chat", "plain"]] = None
    """chat (the chat template and system prompt, as in training) or plain (lm-eval's default: the
    prompt text as it is); default: the suite's, else chat for our tasks and plain for lm_eval ones."""
    target_delimiter: Optional[str] = None
    """Plain prompts: the text between prompt and answer (lm-eval's rule: a space in plain mode,
    nothing under a chat template); a space ending the prompt moves into the answer, as lm-eval does."""
    reference: str = "base"
    """Preference tasks: the policy rewards are measured against: base (the base model with no
    adapter) or an adapter directory (e.g. the SFT adapter a DPO run started from)."""
    beta: float = ranged(0.1, gt=0)
    """Preference tasks: DPO's beta, the scale of the implicit rewards (reward_margin)."""
    data_path: Optional[Path] = field(default=None, init=False)
    """`data` resolved to a file when it is one; None means `data` is a dataset card."""


@dataclass
class Suite:
    """An eval suite file (eval/NAME.yaml), as the module doc shows."""

    name: str = ""
    """Suite name (default: the file's name)."""
    description: str = ""
    """One line saying what the suite measures (shown by `finetune eval`)."""
    prompt: Optional[Literal["chat", "plain"]] = None
    """Every task's prompt convention unless the task names its own (see TaskSpec.prompt)."""
    tasks: list[TaskSpec] = items("task {n}")
    """The tasks, each a mapping (or an lm_eval task name)."""
    path: Optional[Path] = field(default=None, init=False)
    """Where the suite file was found."""


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
    text: Optional[str] = None
    """A plain text scored whole (the rolling perplexities)."""

    def conversation(self) -> list[dict]:
        """Prompt + reference answer: the sequence whose answer tokens the loss is measured on."""
        return [*self.messages, {"role": "assistant", "content": self.answer or ""}]


def load_suite(name: str, data: Optional[str] = None, n: Optional[int] = None,
               max_new_tokens: Optional[int] = None) -> Suite:
    """Read and validate a suite; `data`, `n` and `max_new_tokens` override every task's."""
    try:
        path = find_resource("eval", str(name))
    except UsageError as e:
        if str(e).startswith("unknown"):
            raise UsageError(f"unknown eval suite '{name}'{did_you_mean(str(name), list_resources('eval'))}; "
                             f"known: {', '.join(list_resources('eval'))}") from None
        raise
    raw = read_yaml_mapping(path, "eval suite")
    where = f"eval suite {path}"
    if isinstance(raw.get("tasks"), list):
        raw = {**raw, "tasks": [_shorthands(t) for t in raw["tasks"]]}
    suite = parse_mapping(Suite, raw, where)
    if not suite.tasks:
        raise UsageError(f"{where}: 'tasks' must be a non-empty list")
    suite.name, suite.path = suite.name or path.stem, path
    for i, t in enumerate(suite.tasks):
        t.prompt = t.prompt or suite.prompt or ("plain" if t.lm_eval else "chat")
        _check_task(t, i, path, where)
    names = [t.name for t in suite.tasks]
    dup = next((x for x in names if names.count(x) > 1), None)
    if dup:
        raise UsageError(f"{where}: two tasks are named '{dup}'; give each a distinct name")
    for t in suite.tasks:
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
    return suite


def _shorthands(t: Any) -> Any:
    """A task as written -> its mapping: a bare string is an lm_eval task, `limit` (lm-evaluation-
    harness's word) is n, and a single `generation.stop` string is a list of one."""
    if isinstance(t, str):
        return {"lm_eval": t}
    if not isinstance(t, dict):
        return t
    t = dict(t)
    if "limit" in t:
        limit = t.pop("limit")
        if limit is not None:
            t["n"] = limit
    gen = t.get("generation")
    if isinstance(gen, dict) and isinstance(gen.get("stop"), str):
        t["generation"] = {**gen, "stop": [gen["stop"]]}
    return t


def _check_task(spec: TaskSpec, i: int, suite_path: Path, where: str) -> None:
    """What a task's types cannot say: an lm_eval task or our own with data and metrics."""
    if spec.lm_eval:
        local = _as_file(spec.lm_eval, suite_path.parent)
        if local is not None:
            spec.lm_eval = str(local)
        elif spec.lm_eval.endswith((".yaml", ".yml")):
            raise UsageError(f"{where}: task {i + 1}: lm_eval task file not found: {spec.lm_eval}")
        spec.name = spec.name or Path(spec.lm_eval).stem
        spec.metrics = []
        return
    if not spec.name:
        spec.name = f"task{i + 1}"
    if not spec.metrics:
        raise UsageError(f"{where}: task '{spec.name}': 'metrics' must be a non-empty list")
    spec.metrics = [check_metric(m, f"{where}: task '{spec.name}'") for m in spec.metrics]
    if not spec.data:
        raise UsageError(f"{where}: task '{spec.name}': 'data' is required (a file or a dataset card)")
    spec.data_path = _as_file(spec.data, suite_path.parent)
    if spec.data_path is None and not _is_card(spec.data):
        raise UsageError(f"{where}: task '{spec.name}': data '{spec.data}' is neither a file (relative to the "
                         f"suite) nor a dataset card{did_you_mean(spec.data, list_resources('datasets'))}")
    pref = [m for m in spec.metrics if m in PREFERENCE_METRICS]
    if spec.format == "preference":
        other = next((m for m in spec.metrics if m in CHOICE_METRICS + ROLLING_METRICS), None)
        if other:
            raise UsageError(f"{where}: task '{spec.name}': metric '{other}' does not apply to preference pairs")
        if spec.prompt != "chat":
            raise UsageError(f"{where}: task '{spec.name}': preference pairs are scored as DPO trains on them, "
                             f"through the chat template; drop prompt: plain")
    elif pref:
        raise UsageError(f"{where}: task '{spec.name}': metric '{pref[0]}' needs format: preference (held-out pairs)")
    mc = [m for m in spec.metrics if m in CHOICE_METRICS]
    if spec.format != "eval" and mc:
        raise UsageError(f"{where}: task '{spec.name}': metric '{mc[0]}' needs format: eval rows with 'choices'")
    rolling = [m for m in spec.metrics if m in ROLLING_METRICS]
    if rolling and spec.prompt != "plain":
        raise UsageError(f"{where}: task '{spec.name}': metric '{rolling[0]}' is lm-eval's rolling perplexity of "
                         f"plain text; add prompt: plain to the task or the suite")
    if spec.target_delimiter is not None and spec.prompt != "plain":
        raise UsageError(f"{where}: task '{spec.name}': target_delimiter applies to plain prompts only; "
                         f"add prompt: plain or drop it")


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
    if messages is None and "prompt" not in row and "text" in row:
        if not isinstance(row["text"], str) or not row["text"]:
            raise UsageError(f"{where}: 'text' must be a non-empty string")
        return Example(messages=[], text=row["text"], id=row.get("id"))
    if messages is None and "prompt" in row:
        messages = [{"role": "user", "content": str(row["prompt"])}]
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise UsageError(f"{where}: 'messages' must be a non-empty list of {{role, content}} (or give 'prompt' or 'text')")
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
