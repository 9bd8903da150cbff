"""Held-out rows -> token ids, through the training data pipeline (finetune.data).

Loss is measured with the exact masking used in training (`tokenize_conversation`), and prompts
are rendered by the same chat-template path (`render_prompt`), so an adapter is scored on the
format it was trained on.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from finetune.config import DataConfig
from finetune.data.formats import Conversation
from finetune.data.pipeline import (
    load_conversations,
    render_prompt,
    tokenize_conversation,
)
from finetune.data.rows import read_json_rows
from finetune.errors import UsageError
from finetune.eval.suites import (
    Example,
    TaskSpec,
    example_from_row,
    select_rows,
)


def task_data_config(task: TaskSpec, base: Optional[DataConfig] = None) -> DataConfig:
    """The training DataConfig (a recipe's, when given) with the task's rendering options on top."""
    cfg = dataclasses.replace(base) if base is not None else DataConfig()
    cfg.seq_len = task.seq_len
    cfg.cache = False
    cfg.strict = False
    cfg.packing = False
    cfg.train_on_prompt = False
    if task.system_prompt is not None:
        cfg.system_prompt = task.system_prompt
    if task.prompt_style is not None:
        cfg.prompt_style = task.prompt_style
    if task.format not in ("eval", "preference"):  # those two read their own file (no recipe split)
        if base is None or (base.card, base.path) != (task.data, None):
            # Not the recipe's own data: no recipe split to mirror, only its row count settings.
            cfg.val_path, cfg.max_rows = None, None
        if task.data_path is not None:
            cfg.card, cfg.path = None, str(task.data_path)
        else:
            cfg.card, cfg.path = task.data, None
        cfg.format = task.format if task.format not in ("auto", None) else cfg.format
        cfg.split, cfg.subset = task.split, task.subset
        if task.rows == "heldout" and cfg.val_fraction <= 0 and not cfg.val_path:
            cfg.val_fraction = DataConfig.val_fraction
    return cfg


def load_examples(task: TaskSpec, data_cfg: DataConfig, seed: int = 42) -> list[Example]:
    """The task's held-out rows as Examples (first or last n)."""
    if task.format == "eval":
        if task.data_path is None:
            raise UsageError(f"task '{task.name}': format eval needs a file, got '{task.data}'")
        rows = select_rows(read_json_rows(task.data_path, "eval data").rows, task)
        return [example_from_row(r, f"{task.data_path} row {i + 1}") for i, r in enumerate(rows)]
    # "heldout": the validation rows training set aside (same shuffle seed and val_fraction).
    convs, _ = load_conversations(data_cfg, seed=seed, split="val" if task.rows == "heldout" else "all")
    convs = select_rows(list(convs), task)
    out = []
    for conv in convs:
        chat = _chat(conv)
        if chat and chat[-1]["role"] == "assistant":
            out.append(Example(messages=chat[:-1], answer=chat[-1]["content"]))
    if not out:
        raise UsageError(f"task '{task.name}': no usable rows in {task.data}")
    return out


def _chat(conv) -> list[dict]:
    if hasattr(conv, "chat"):
        return conv.chat()
    return list(getattr(conv, "messages", conv))


def to_conversation(messages: list[dict], data_cfg: DataConfig):
    """Chat messages (maybe with a leading system turn) -> finetune.data Conversation; the
    configured system prompt fills in where a row has none, as in training."""
    msgs = [dict(m) for m in messages]
    system = msgs.pop(0)["content"] if msgs and msgs[0]["role"] == "system" else data_cfg.system_prompt
    return Conversation(messages=msgs, system=system or None)


def prompt_ids(example: Example, tokenizer, data_cfg: DataConfig) -> list[int]:
    """Prompt tokens up to and including the assistant generation header."""
    return list(render_prompt(to_conversation(example.messages, data_cfg), tokenizer, data_cfg))


def loss_ids(example: Example, tokenizer, data_cfg: DataConfig) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with the training masking: only the answer (+ end of turn) is scored."""
    ids, labels = tokenize_conversation(to_conversation(example.conversation(), data_cfg), tokenizer, data_cfg)
    if len(ids) > data_cfg.seq_len:  # same policy as training, but a held-out row is never dropped
        ids, labels = ids[:data_cfg.seq_len], labels[:data_cfg.seq_len]
    return [int(x) for x in ids], [int(x) for x in labels]

