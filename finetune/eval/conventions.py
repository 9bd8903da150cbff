"""Prompt conventions: how a task's prompt and answer become tokens, and the label each score carries.

`chat` (our tasks' default): the prompt goes through the chat template with the system prompt, as
training renders it (finetune.eval.prompting); an option or answer follows the generation header
directly (lm-eval's rule under a chat template: no target delimiter).

`plain` (lm-evaluation-harness's default, its `--model hf` without --apply_chat_template): the
prompt is text as it is. The rules below are lm-eval 0.4's (api/task.py, api/model.py,
models/huggingface.py, utils.py), restated here because lm-eval is an optional extra:

- the continuation is `target_delimiter + answer` (" " unless the task says otherwise);
- whitespace ending the context moves to the start of the continuation, and the pair is encoded
  whole and split at the context's token count (TemplateLM._encode_pair), so the answer's first
  token is the one the whole text has;
- strings are encoded with the tokenizer's own special-token default, but not when they already
  start with the start token (HFLM.tok_encode); an empty context is the start token alone;
- the start token is BOS, else EOS (HFLM.prefix_token_id);
- a whole text (rolling log-likelihood) is scored in disjoint windows of the model's context
  length, the first conditioned on the start token, so every token is scored
  (utils.get_rolling_token_windows + make_disjoint_window, context_len=1).

A system prompt in plain mode comes first, followed by a blank line (lm-eval joins its
system_instruction with no separator; parity holds with no system prompt).
"""

from __future__ import annotations

from typing import Optional

from finetune.config import DataConfig

PLAIN_DELIMITER = " "
TURN_SEPARATOR = "\n\n"  # lm-eval's fewshot_delimiter: between system prompt and turns in plain mode
_DEFAULT_MAX_LENGTH = 2048  # HFLM's when neither the config nor the tokenizer says


def delimiter(task) -> str:
    """Text between prompt and answer: the task's target_delimiter, else lm-eval's rule."""
    if task.prompt != "plain":
        return ""
    return PLAIN_DELIMITER if task.target_delimiter is None else task.target_delimiter


def plain_system(task, messages: list[dict]) -> Optional[str]:
    """The system prompt of a plain prompt: the row's own, else the task's (not the recipe's:
    plain mode is lm-eval's convention, which has none unless asked)."""
    if messages and messages[0]["role"] == "system":
        return str(messages[0]["content"])
    return task.system_prompt


def plain_prompt(task, messages: list[dict]) -> str:
    """The prompt of a plain task: system prompt, then each turn's text, a blank line apart."""
    system = plain_system(task, messages)
    turns = [str(m["content"]) for m in messages if m["role"] != "system"]
    return TURN_SEPARATOR.join(([system] if system else []) + turns)


def prefix_token_id(tokenizer) -> int:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode(tokenizer, text: str) -> list[int]:
    start = prefix_token_id(tokenizer)
    if start is not None and text.startswith(tokenizer.decode([start])):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(text))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's loglikelihood requests tokenize them."""
    if context == "":
        cont = list(tokenizer.encode(continuation, add_special_tokens=False))
        start = prefix_token_id(tokenizer)
        return (cont[:1], cont[1:]) if cont and cont[0] == start else ([start], cont)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(tokenizer, context + continuation)
    n = len(encode(tokenizer, context))
    return whole[:n], whole[n:]


def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, scored tokens) windows covering every token once (lm-eval's, context_len=1)."""
    out: list[tuple[list[int], list[int]]] = []
    if not tokens:
        return out
    first = min(max_len, len(tokens))
    out.append(([prefix], tokens[:first]))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        ctx = tokens[max(end - max_len - 1, 0):end - 1]
        out.append((ctx[:len(ctx) - (n - 1)], tokens[end - n:end]))
        done = end
    return out


def max_length(model, tokenizer) -> int:
    """The model's context length, found where HFLM looks for it."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if config is not None and isinstance(getattr(config, attr, None), int):
            return int(getattr(config, attr))
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if isinstance(n, int) and n < 10**9 else _DEFAULT_MAX_LENGTH


def describe(task, data_cfg: Optional[DataConfig] = None, num_fewshot: Optional[int] = None) -> dict:
    """A task's convention as scores.json records it (and scores.md shows it)."""
    if task.prompt == "plain":
        system = task.system_prompt
        out = {"prompt": "plain", "system_prompt": system, "target_delimiter": delimiter(task)}
    else:
        recipe = data_cfg.system_prompt if data_cfg is not None and not task.lm_eval else None
        system = task.system_prompt if task.system_prompt is not None else recipe
        out = {"prompt": "chat", "system_prompt": system, "target_delimiter": ""}
    if task.lm_eval:
        out["target_delimiter"] = "the task's" if task.prompt == "plain" else ""
    out["num_fewshot"] = (task.num_fewshot if task.lm_eval else 0) if num_fewshot is None else num_fewshot
    out["harness"] = "lm-evaluation-harness" if task.lm_eval else "finetune"
    if getattr(task, "format", None) == "preference":
        out["reference"], out["beta"] = task.reference, task.beta
    return out


def label(conv: dict) -> str:
    """One line: 'plain text, no system prompt, 0-shot' / 'chat template, system prompt "..."'."""
    what = "chat template" if conv["prompt"] == "chat" else "plain text"
    system = conv.get("system_prompt")
    own = " (rows may carry one)" if conv["harness"] == "finetune" else ""
    sys_part = f'system prompt "{_short(system)}"' if system else f"no system prompt{own}"
    shots = conv.get("num_fewshot")
    shots_part = f"{shots}-shot" if shots is not None else "the task's few-shot"
    ref = f", reference {conv['reference']}, beta {conv['beta']:g}" if conv.get("reference") else ""
    return f"{what}, {sys_part}, {shots_part}{ref} ({conv['harness']})"


def _short(text: str, n: int = 40) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 1] + "…"
