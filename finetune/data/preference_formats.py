"""Preference rows of any supported format -> `PrefExample`: the prompt conversation plus chosen and
rejected answers (pairs: DPO, ORPO, SimPO), or one completion and its label (unpaired feedback: KTO).

Formats (`data.format`; null = detected from the first row, `detect_preference_format`):
  - `sharegpt`: ShareGPT pairs (LLaMA-Factory's dpo_en_demo): `conversations` is the prompt
    (turns {from, value}), `chosen` and `rejected` one answer each (a {from, value} turn, a list
    holding one, or a string). Unpaired: `conversations` ends with the judged answer and `label`
    is a boolean (LLaMA-Factory names it `kto_tag`: data.columns={label: kto_tag}).
  - `messages`: OpenAI {role, content} messages. Unpaired (kto_en_demo): `messages` ends with the
    judged assistant message, `label` a boolean. Pairs: `messages` is the prompt, `chosen`/`rejected`
    the answers.
  - `trl`: TRL's preference types. `{prompt, chosen, rejected}` as strings (a user turn and the
    answers) or message lists; the implicit-prompt form `{chosen, rejected}` where both are whole
    conversations (or texts) sharing a prefix, the prompt being that prefix; unpaired
    `{prompt, completion, label}`. `system` and `tools` columns are read when present.
  - `openai`: OpenAI preference fine-tuning JSONL: `input` {messages, tools}, `preferred_output`
    and `non_preferred_output` (lists holding one assistant message).

Whatever the format, the prompt is one Conversation (system prompt, tools, earlier turns) ending
with a user or tool turn, and each answer is ONE assistant message (tool calls allowed), so that
the chat template renders the prompt once and each answer as the assistant turn SFT would train.
Rows that cannot be a pair raise `BadRow` with a counted reason (finetune.data.preference counts
them, or refuses the first with data.strict=true): `missing side`, `identical chosen and rejected`,
`prompts differ between chosen and rejected`, `prompt differs from the conversations`,
`answer is not one assistant turn`, `prompt ends with an assistant turn`, `empty prompt`, and the
SFT adapters' own reasons (missing field, wrong type, unknown role, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from finetune.data.formats import (
    ROLES,
    SHAREGPT_ROLES,
    BadRow,
    Conversation,
    _finish,
    _get,
    _text,
    _tools,
    _turns_to_messages,
)
from finetune.data.rows import read_json_rows
from finetune.errors import UsageError

PREF_FORMATS = ("sharegpt", "messages", "trl", "openai")
PREF_COLUMNS = {
    "sharegpt": {"conversations": "conversations", "chosen": "chosen", "rejected": "rejected", "label": "label",
                 "tools": "tools", "system": "system", "from": "from", "value": "value"},
    "messages": {"messages": "messages", "chosen": "chosen", "rejected": "rejected", "label": "label",
                 "tools": "tools", "role": "role", "content": "content"},
    "trl": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "completion": "completion",
            "label": "label", "system": "system", "tools": "tools"},
    "openai": {"input": "input", "preferred_output": "preferred_output",
               "non_preferred_output": "non_preferred_output"},
}


@dataclass
class PrefExample:
    """One preference example: `prompt` (its messages end with a user or tool turn) and either
    `chosen` + `rejected` (assistant messages) or `completion` (an assistant message) + `label`."""

    prompt: Conversation
    chosen: Optional[dict] = None
    rejected: Optional[dict] = None
    completion: Optional[dict] = None
    label: Optional[bool] = None

    @property
    def paired(self) -> bool:
        return self.chosen is not None

    def answers(self) -> list[dict]:
        """The answers to render after the prompt: [chosen, rejected] or [completion]."""
        return [self.chosen, self.rejected] if self.paired else [self.completion]

    def unpaired(self) -> list["PrefExample"]:
        """A pair as unpaired feedback (TRL's unpair_preference_dataset): chosen desirable,
        rejected undesirable; unpaired feedback as it is."""
        if not self.paired:
            return [self]
        return [PrefExample(self.prompt, completion=self.chosen, label=True),
                PrefExample(self.prompt, completion=self.rejected, label=False)]


def pref_columns(fmt: str, overrides: Optional[dict] = None) -> dict[str, str]:
    """The column names of preference format `fmt` with data.columns overrides (unknown names refused)."""
    if fmt not in PREF_COLUMNS:
        raise UsageError(f"data.format={fmt} is not a preference format (expected one of {', '.join(PREF_FORMATS)}, "
                         "or null to detect it from the rows)")
    cols = dict(PREF_COLUMNS[fmt])
    for k, v in (overrides or {}).items():
        if k not in cols:
            raise UsageError(f"data.columns: '{k}' is not a {fmt} preference column (expected one of {', '.join(cols)})")
        cols[k] = str(v)
    return cols


def detect_preference_format(row: Any) -> Optional[str]:
    """The preference format a row's default columns give away, or None."""
    if not isinstance(row, dict):
        return None
    if isinstance(row.get("input"), dict) and ("preferred_output" in row or "non_preferred_output" in row):
        return "openai"
    if row.get("conversations") is not None:
        return "sharegpt"
    if any(row.get(c) is not None for c in ("prompt", "chosen", "rejected", "completion")):
        return "trl"  # before messages: ultrafeedback_binarized rows carry a `messages` copy as well
    if row.get("messages") is not None:
        return "messages"
    return None


def is_unpaired_row(row: Any, fmt: str, cols: dict) -> bool:
    """A row of unpaired feedback (a label, no chosen/rejected): what a pair objective cannot use."""
    if not isinstance(row, dict) or fmt == "openai":
        return False
    return row.get(cols["label"]) is not None and row.get(cols["chosen"]) is None and row.get(cols["rejected"]) is None


# ------------------------------------------------------------------------------ pieces


def _assistant(msgs: list[dict], where: str) -> dict:
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        roles = ", ".join(m["role"] for m in msgs) or "nothing"
        raise BadRow("answer is not one assistant turn", where, f"got {roles}")
    return msgs[0]


def _side(row: dict, col: str) -> Any:
    """A chosen/rejected/completion value, refused as a missing side when absent or empty."""
    v = row.get(col)
    if v is None or v == "" or v == [] or v == {} or (isinstance(v, str) and not v.strip()):
        raise BadRow("missing side", col, "absent" if v is None else "empty")
    return v


def _as_messages(value: Any, where: str, role_key: str, content_key: str, role_map: dict, fixes: list) -> list[dict]:
    """A side or prompt as messages: a string is one turn (role decided by the caller: None here),
    a single turn object or a list of turns is read like the SFT adapters read turns."""
    turns = value if isinstance(value, list) else [value]
    return _turns_to_messages(turns, where, role_key, content_key, role_map, fixes)


def _prompt(messages: list[dict], system: Optional[str], tools: Optional[list], fixes: list) -> Conversation:
    conv = _finish(list(messages), system, tools, fixes, answered=False)
    if not conv.messages:
        raise BadRow("empty prompt", "", "no user turn before the answer")
    if conv.messages[-1]["role"] == "assistant":
        raise BadRow("prompt ends with an assistant turn", "", "the answer would follow another answer")
    return conv


def _same(a: dict, b: dict) -> bool:
    return a.get("content", "").strip() == b.get("content", "").strip() and a.get("tool_calls") == b.get("tool_calls")


def _pair(prompt: Optional[list[dict]], chosen: list[dict], rejected: list[dict], chosen_col: str,
          rejected_col: str) -> tuple[list[dict], dict, dict]:
    """(prompt messages, chosen, rejected) from an explicit prompt and/or whole conversations.

    A side holding more than its answer is a whole conversation (TRL's implicit prompt,
    ultrafeedback's chosen/rejected): everything before its last message is its prompt, and the
    two prompts (and an explicit prompt column, when given) must agree."""
    prompts, answers = {}, {}
    for col, msgs in ((chosen_col, chosen), (rejected_col, rejected)):
        answers[col] = msgs
        if any(m["role"] != "assistant" for m in msgs):
            prompts[col], answers[col] = msgs[:-1], msgs[-1:]
    if len(prompts) == 2 and prompts[chosen_col] != prompts[rejected_col]:
        raise BadRow("prompts differ between chosen and rejected", rejected_col)
    shared = next(iter(prompts.values()), None)
    if shared is not None and prompt is not None and shared and shared != prompt:
        raise BadRow("prompt differs from the conversations", next(iter(prompts)))
    c = _assistant(answers[chosen_col], chosen_col)
    r = _assistant(answers[rejected_col], rejected_col)
    if _same(c, r):
        raise BadRow("identical chosen and rejected", rejected_col)
    full = prompt if prompt is not None else shared
    if full is None:
        raise BadRow("missing field", "prompt", "and chosen/rejected are not whole conversations")
    return full, c, r


def _label(row: dict, col: str) -> bool:
    v = _get(row, col)
    if not isinstance(v, bool):
        raise BadRow("wrong type", col, f"expected true or false, got {type(v).__name__}")
    return v


def _text_prefix(chosen: str, rejected: str) -> int:
    """TRL's implicit prompt of two texts: their common prefix, less a space that starts the answers."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    if 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
        n -= 1
    return n


# ------------------------------------------------------------------------------ the formats


def _role_map(base: dict, roles: dict) -> dict:
    return {**base, **{k.lower(): v for k, v in roles.items()}}


def _answer_list(value: Any, where: str, role_key: str, content_key: str, role_map: dict, fixes: list) -> list[dict]:
    """A side as messages: a bare string is the assistant's answer."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    return _as_messages(value, where, role_key, content_key, role_map, fixes)


def _judged(msgs: list[dict], col: str, system, tools, label: bool, fixes: list) -> PrefExample:
    """Unpaired feedback whose conversation ends with the judged answer."""
    if not msgs or msgs[-1]["role"] != "assistant":
        raise BadRow("missing side", col, "the conversation does not end with the judged answer")
    return PrefExample(_prompt(msgs[:-1], system, tools, fixes), completion=msgs[-1], label=label)


def _from_dialogue(row: dict, cols: dict, fixes: list, conv_col: str, role_key: str, content_key: str,
                   role_map: dict, system: Optional[str]) -> PrefExample:
    """sharegpt and messages: a dialogue column that is the prompt (pairs) or ends with the judged answer."""
    turns = _get(row, conv_col)
    if not isinstance(turns, list):
        raise BadRow("conversation not a list", conv_col, f"got {type(turns).__name__}")
    if not turns:
        raise BadRow("empty conversation", conv_col)
    msgs = _turns_to_messages(turns, conv_col, role_key, content_key, role_map, fixes)
    tools = _tools(row, cols["tools"])
    if is_unpaired_row(row, "", cols):
        return _judged(msgs, conv_col, system, tools, _label(row, cols["label"]), fixes)
    sides = [_answer_list(_side(row, cols[k]), cols[k], role_key, content_key, role_map, fixes)
             for k in ("chosen", "rejected")]
    prompt, c, r = _pair(msgs, *sides, cols["chosen"], cols["rejected"])
    return PrefExample(_prompt(prompt, system, tools, fixes), chosen=c, rejected=r)


def from_sharegpt(row: dict, cols: dict, roles: dict, fixes: list) -> PrefExample:
    return _from_dialogue(row, cols, fixes, cols["conversations"], cols["from"], cols["value"],
                          _role_map(SHAREGPT_ROLES, roles), _text(row, cols["system"], required=False))


def from_messages(row: dict, cols: dict, roles: dict, fixes: list) -> PrefExample:
    return _from_dialogue(row, cols, fixes, cols["messages"], cols["role"], cols["content"],
                          _role_map({r: r for r in ROLES}, roles), None)


def from_trl(row: dict, cols: dict, roles: dict, fixes: list) -> PrefExample:
    role_map = _role_map({r: r for r in ROLES}, roles)
    system = _text(row, cols["system"], required=False, allow_empty=True)
    tools = _tools(row, cols["tools"])
    raw_prompt = row.get(cols["prompt"])
    if isinstance(raw_prompt, str) and not raw_prompt.strip():
        raise BadRow("empty prompt", cols["prompt"])
    prompt = None
    if isinstance(raw_prompt, str):
        prompt = [{"role": "user", "content": raw_prompt}]
    elif raw_prompt is not None:
        if not isinstance(raw_prompt, list):
            raise BadRow("wrong type", cols["prompt"], f"expected a string or a list of messages, got {type(raw_prompt).__name__}")
        prompt = _as_messages(raw_prompt, cols["prompt"], "role", "content", role_map, fixes)
    if is_unpaired_row(row, "trl", cols) or (row.get(cols["completion"]) is not None and row.get(cols["chosen"]) is None):
        done = _answer_list(_side(row, cols["completion"]), cols["completion"], "role", "content", role_map, fixes)
        label = _label(row, cols["label"])
        if prompt is None or len(done) > 1:  # a whole conversation: it ends with the judged answer
            return _judged((prompt or []) + done, cols["completion"], system, tools, label, fixes)
        return PrefExample(_prompt(prompt, system, tools, fixes), completion=_assistant(done, cols["completion"]),
                           label=label)
    chosen, rejected = _side(row, cols["chosen"]), _side(row, cols["rejected"])
    if prompt is None and isinstance(chosen, str) and isinstance(rejected, str):
        n = _text_prefix(chosen, rejected)  # implicit prompt of two texts
        if chosen == rejected:
            raise BadRow("identical chosen and rejected", cols["rejected"])
        if not chosen[:n].strip():
            raise BadRow("missing field", cols["prompt"], "and chosen/rejected share no prefix")
        prompt, chosen, rejected = [{"role": "user", "content": chosen[:n]}], chosen[n:], rejected[n:]
        for col, v in ((cols["chosen"], chosen), (cols["rejected"], rejected)):
            if not v.strip():
                raise BadRow("missing side", col, "nothing after the shared prompt")
    sides = [_answer_list(v, cols[k], "role", "content", role_map, fixes)
             for k, v in (("chosen", chosen), ("rejected", rejected))]
    full, c, r = _pair(prompt, *sides, cols["chosen"], cols["rejected"])
    return PrefExample(_prompt(full, system or None, tools, fixes), chosen=c, rejected=r)


def from_openai(row: dict, cols: dict, roles: dict, fixes: list) -> PrefExample:
    inp = _get(row, cols["input"])
    if not isinstance(inp, dict):
        raise BadRow("wrong type", cols["input"], f"expected an object with messages, got {type(inp).__name__}")
    where = f"{cols['input']}.messages"
    turns = inp.get("messages")
    if not isinstance(turns, list) or not turns:
        raise BadRow("missing field" if turns is None else "empty conversation" if turns == [] else "conversation not a list",
                     where)
    role_map = _role_map({r: r for r in ROLES}, roles)
    msgs = _turns_to_messages(turns, where, "role", "content", role_map, fixes)
    tools = _tools(inp, "tools")
    sides = [_as_messages(_side(row, cols[k]), cols[k], "role", "content", role_map, fixes)
             for k in ("preferred_output", "non_preferred_output")]
    prompt, c, r = _pair(msgs, *sides, cols["preferred_output"], cols["non_preferred_output"])
    return PrefExample(_prompt(prompt, None, tools, fixes), chosen=c, rejected=r)


PREF_ADAPTERS = {"sharegpt": from_sharegpt, "messages": from_messages, "trl": from_trl, "openai": from_openai}


def to_preference(row: Any, fmt: str, cols: dict, roles: Optional[dict] = None, system_prompt: Optional[str] = None,
                  fixes: Optional[list] = None) -> PrefExample:
    """One raw row of preference format `fmt` -> PrefExample, or BadRow (module doc).
    `system_prompt` (data.system_prompt) is given to a prompt that has none."""
    if not isinstance(row, dict):
        raise BadRow("wrong type", "row", f"expected an object, got {type(row).__name__}")
    ex = PREF_ADAPTERS[fmt](row, cols, roles or {}, fixes if fixes is not None else [])
    if system_prompt and not ex.prompt.system:
        ex.prompt.system = system_prompt
    return ex


def first_format(rows: list, where: str) -> str:
    """The preference format of the first row (data.format=null): a one-line refusal when none fits."""
    first = next((r for r in rows if isinstance(r, dict)), None)
    fmt = detect_preference_format(first)
    if fmt is None:
        keys = ", ".join(sorted(first)[:8]) if first else "no object rows"
        raise UsageError(f"{where}: cannot tell the preference format from the first row (columns: {keys}); set "
                         f"data.format to one of {', '.join(PREF_FORMATS)} (and data.columns to rename columns)")
    return fmt


@dataclass
class PrefRows:
    """Preference examples read from a file, where each came from, and the rows dropped by reason."""

    examples: list[PrefExample] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    dropped: dict = field(default_factory=dict)
    format: str = ""


def read_preference_rows(path, fmt: Optional[str] = None, columns: Optional[dict] = None,
                         roles: Optional[dict] = None, system_prompt: Optional[str] = None,
                         strict: bool = True, what: str = "eval data") -> PrefRows:
    """Every preference example of a JSON / JSON Lines file (eval suites read held-out pairs with
    it). fmt=None detects the format; strict=True refuses the first bad row in one line, else bad
    rows are counted in `dropped`."""
    rows = read_json_rows(Path(path), what, strict=strict)
    if not rows.rows:
        raise UsageError(f"{what} {path}: no rows")
    fmt = fmt or first_format(rows.rows, f"{what} {path}")
    cols = pref_columns(fmt, columns)
    out = PrefRows(format=fmt)
    for where, _ in rows.broken:
        out.dropped["invalid JSON line"] = out.dropped.get("invalid JSON line", 0) + 1
    for row, where in zip(rows.rows, rows.where):
        try:
            ex = to_preference(row, fmt, cols, roles, system_prompt)
        except BadRow as e:
            if strict:
                field_part = f" field '{e.field}'" if e.field else ""
                raise UsageError(f"{where}:{field_part} {e.reason}{': ' + e.detail if e.detail else ''}") from None
            out.dropped[e.reason] = out.dropped.get(e.reason, 0) + 1
            continue
        out.examples.append(ex)
        out.where.append(where)
    return out
