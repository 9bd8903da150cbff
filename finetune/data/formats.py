"""Format adapters: one raw row (alpaca, sharegpt, messages, text, prompt/completion) -> `Conversation`.

Every adapter either returns a Conversation or raises `BadRow(reason, field, detail)`; the caller
counts the reason (or, with strict=True, turns it into a one-line UsageError naming the row).
Messy-data policy (ShareGPT dumps in the wild):
  - a leading system turn becomes `Conversation.system`;
  - leading assistant turns (a conversation that starts with gpt) are dropped and counted as a fix
    ("fixed: leading assistant turn dropped"): the rest of the dialogue is still good data;
  - trailing user/tool turns are trimmed and counted ("fixed: trailing user turn trimmed",
    "fixed: trailing tool turn trimmed"): they have no answer to train on;
  - anything else malformed drops the row with a reason.
Tool calls stay structured: a ShareGPT `function_call` turn and an OpenAI `tool_calls` list both
become the assistant message's `tool_calls` ([{type: function, function: {name, arguments}}],
arguments decoded to an object), so the chat template renders them in its own format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

from finetune.errors import UsageError

ROLES = ("system", "user", "assistant", "tool")
# The keys of ADAPTERS, plus trl and openai: preference-only formats (finetune.data.preference_formats,
# where sharegpt and messages also read pairs and labelled answers).
Format = Literal["alpaca", "sharegpt", "messages", "text", "prompt_completion", "trl", "openai"]
PREFERENCE_ONLY = ("trl", "openai")

# ShareGPT speaker names seen in real dumps -> normalized role. `function_call` is an assistant
# turn whose content is the call itself (the model must learn to emit it).
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant", "function_call": "assistant",
    "system": "system",
    "observation": "tool", "tool": "tool", "function_response": "tool",
}

# Default column names per format; DataConfig.columns / the card's `columns` rename them.
DEFAULT_COLUMNS = {
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output",
               "system": "system", "history": "history"},
    "sharegpt": {"conversations": "conversations", "tools": "tools", "system": "system",
                 "from": "from", "value": "value"},
    "messages": {"messages": "messages", "tools": "tools", "role": "role", "content": "content"},
    "text": {"text": "text"},
    "prompt_completion": {"prompt": "prompt", "completion": "completion", "system": "system"},
}


@dataclass
class Conversation:
    """A normalized training example.

    `messages` holds {role, content} dicts with roles user/assistant/tool (and system only where a
    dataset puts one mid-dialogue); the leading system prompt lives in `system`. An assistant
    message may carry `tool_calls` (OpenAI form), a tool message `name`/`tool_call_id`, an alpaca
    user message its `instruction` and `input` apart. `text` is set instead for plain continued
    pre-training rows (every token is trained)."""

    messages: list[dict] = field(default_factory=list)
    system: Optional[str] = None
    tools: Optional[list] = None
    text: Optional[str] = None

    def chat(self) -> list[dict[str, str]]:
        """Messages with the system prompt as a leading system message (what templates expect)."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + list(self.messages)


class BadRow(Exception):
    """A row that cannot become a training example: `reason` is the counted bucket."""

    def __init__(self, reason: str, field: str = "", detail: str = ""):
        super().__init__(f"{reason}: {field} {detail}".strip())
        self.reason, self.field, self.detail = reason, field, detail


def _get(row: dict, col: str, required: bool = True) -> Any:
    if col not in row or row[col] is None:
        if required:
            raise BadRow("missing field", col)
        return None
    return row[col]


def _text(row: dict, col: str, required: bool = True, allow_empty: bool = False) -> Optional[str]:
    v = _get(row, col, required)
    if v is None:
        return None
    if not isinstance(v, str):
        raise BadRow("wrong type", col, f"expected a string, got {type(v).__name__}")
    if required and not allow_empty and not v.strip():
        raise BadRow("empty turn", col)
    return v


def _tools(row: dict, col: str) -> Optional[list]:
    v = row.get(col)
    if v is None or v == "" or v == []:
        return None
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError as e:
            raise BadRow("wrong type", col, f"tools is not valid JSON ({e.msg})") from None
    if isinstance(v, dict):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(t, dict) for t in v):
        raise BadRow("wrong type", col, "expected a list of tool schemas")
    # Bare {name, description, parameters} schemas (glaive, LLaMA-Factory) in the OpenAI form
    # {type: function, function: ...} that chat templates are written for.
    return [t if "function" in t or "name" not in t else {"type": "function", "function": t} for t in v] or None


def _finish(messages: list[dict], system: Optional[str], tools: Optional[list], fixes: list[str],
            answered: bool = True) -> Conversation:
    """Apply the messy-dialogue policy and check there is something to train on (answered=False:
    only the leading system turn is taken out; a prompt is kept as it stands)."""
    if messages and messages[0]["role"] == "system":
        lead = messages.pop(0)["content"]
        if system and system.strip() != lead.strip():
            raise BadRow("two system prompts", "system", "a system column and a different leading system turn")
        system = system or lead
    if not answered:
        return Conversation(messages=messages, system=system or None, tools=tools)
    dropped_lead = 0
    while messages and messages[0]["role"] == "assistant":
        messages.pop(0)
        dropped_lead += 1
    if dropped_lead:
        fixes.append("fixed: leading assistant turn dropped")
    trimmed = set()
    while messages and messages[-1]["role"] != "assistant":
        trimmed.add(messages.pop()["role"])
    for role in sorted(trimmed):
        fixes.append(f"fixed: trailing {role} turn trimmed")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no assistant turn", "")
    return Conversation(messages=messages, system=system or None, tools=tools)


def _check_turns(turns: Any, col: str) -> list:
    if not isinstance(turns, list):
        raise BadRow("conversation not a list", col, f"got {type(turns).__name__}")
    if not turns:
        raise BadRow("empty conversation", col)
    return turns


def from_alpaca(row: dict, cols: dict, roles: dict, fixes: list, answered: bool = True) -> Conversation:
    instruction = _text(row, cols["instruction"])
    inp = _text(row, cols["input"], required=False) or ""
    output = _text(row, cols["output"], required=answered)
    system = _text(row, cols["system"], required=False)
    messages = []
    history = row.get(cols["history"]) or []
    if not isinstance(history, list):
        raise BadRow("wrong type", cols["history"], "expected a list of [instruction, output] pairs")
    for pair in history:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) and x.strip() for x in pair)):
            raise BadRow("wrong type", cols["history"], "expected [instruction, output] string pairs")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = {"role": "user", "content": instruction}
    if inp.strip():
        # Chat templates get one user message; the alpaca prompt style renders `input` under its
        # own "### Input:" header (the Stanford template), so it is kept apart as well.
        user = {"role": "user", "content": f"{instruction}\n\n{inp}", "instruction": instruction, "input": inp}
    messages += [user] + ([] if output is None else [{"role": "assistant", "content": output}])
    return Conversation(messages=messages, system=system or None)


def _arguments(args: Any, where: str) -> Any:
    """Call arguments as an object: templates render them with `tojson`, so a JSON string would
    be rendered as a quoted string. A string that is not a JSON object is kept as it is."""
    if isinstance(args, str):
        try:
            decoded = json.loads(args)
        except json.JSONDecodeError:
            return args
        return decoded if isinstance(decoded, dict) else args
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise BadRow("bad tool call", where, f"arguments must be an object, got {type(args).__name__}")
    return args


def _tool_call(call: Any, where: str) -> dict:
    """{name, arguments} or OpenAI {id?, type, function: {name, arguments}} -> the OpenAI form."""
    if not isinstance(call, dict):
        raise BadRow("bad tool call", where, f"expected an object, got {type(call).__name__}")
    fn = call.get("function") if isinstance(call.get("function"), dict) else call
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip():
        raise BadRow("bad tool call", where, "no function name")
    out = {"type": "function", "function": {"name": name, "arguments": _arguments(fn.get("arguments"), where)}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _function_call_turn(content: Any, where: str) -> list[dict]:
    """A ShareGPT function_call value (JSON text or object, one call or a list) -> tool_calls."""
    if isinstance(content, str):
        try:
            content = json.loads(content)
        except json.JSONDecodeError as e:
            raise BadRow("bad tool call", where, f"function_call is not JSON ({e.msg})") from None
    calls = content if isinstance(content, list) else [content]
    if not calls:
        raise BadRow("bad tool call", where, "empty list of calls")
    return [_tool_call(c, where) for c in calls]


def _content(content: Any, where: str, fixes: list) -> str:
    """Message content: a string, or OpenAI content parts (text parts joined, the rest dropped)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts, other = [], set()
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                other.add(kind if isinstance(kind, str) else type(part).__name__)
        for kind in sorted(other):
            fixes.append(f"fixed: {kind} content part dropped")
        if other and not "".join(texts).strip():
            raise BadRow("only non-text content", where, ", ".join(sorted(other)))
        return "\n".join(texts)
    raise BadRow("wrong type", where, f"expected a string or a list of content parts, got {type(content).__name__}")


def _turns_to_messages(turns: list, col: str, role_key: str, content_key: str, role_map: dict,
                       fixes: list) -> list[dict]:
    messages: list[dict] = []
    for i, turn in enumerate(turns):
        where = f"{col}[{i}]"
        if not isinstance(turn, dict):
            raise BadRow("wrong type", where, f"expected an object, got {type(turn).__name__}")
        raw_role = turn.get(role_key)
        if not isinstance(raw_role, str):
            raise BadRow("missing field" if raw_role is None else "wrong type", f"{where}.{role_key}")
        role = role_map.get(raw_role.lower())
        if role is None:
            raise BadRow("unknown role", f"{where}.{role_key}", repr(raw_role))
        content = turn.get(content_key)
        msg: dict = {"role": role}
        if raw_role.lower() == "function_call":  # ShareGPT: the call itself is the turn's value
            if content is None:
                raise BadRow("missing field", f"{where}.{content_key}")
            msg["content"], msg["tool_calls"] = "", _function_call_turn(content, f"{where}.{content_key}")
        else:
            calls = turn.get("tool_calls") if role == "assistant" else None
            if calls is not None:  # OpenAI: content may be null or "" next to the calls
                if not isinstance(calls, list):
                    raise BadRow("bad tool call", f"{where}.tool_calls", f"expected a list, got {type(calls).__name__}")
                msg["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{k}]") for k, c in enumerate(calls)]
            if content is None and not msg.get("tool_calls"):
                raise BadRow("missing field", f"{where}.{content_key}")
            if isinstance(content, (dict, list)) and role == "tool":
                content = json.dumps(content, ensure_ascii=False)  # a structured tool result
            text = "" if content is None else _content(content, f"{where}.{content_key}", fixes)
            if not text.strip() and not msg.get("tool_calls"):
                raise BadRow("empty turn", f"{where}.{content_key}")
            msg["content"] = text
            for key in ("name", "tool_call_id"):  # which call a tool result answers: templates use them
                if role == "tool" and isinstance(turn.get(key), str):
                    msg[key] = turn[key]
        prev = messages[-1] if messages else None
        if msg.get("tool_calls") and prev is not None and prev["role"] == "assistant" and not prev.get("tool_calls"):
            prev["tool_calls"] = msg["tool_calls"]  # text then a call: one assistant message
            continue
        messages.append(msg)
    return messages


def from_sharegpt(row: dict, cols: dict, roles: dict, fixes: list, answered: bool = True) -> Conversation:
    turns = _check_turns(_get(row, cols["conversations"]), cols["conversations"])
    role_map = {**SHAREGPT_ROLES, **{k.lower(): v for k, v in roles.items()}}
    messages = _turns_to_messages(turns, cols["conversations"], cols["from"], cols["value"], role_map, fixes)
    return _finish(messages, _text(row, cols["system"], required=False), _tools(row, cols["tools"]), fixes, answered)


def from_messages(row: dict, cols: dict, roles: dict, fixes: list, answered: bool = True) -> Conversation:
    turns = _check_turns(_get(row, cols["messages"]), cols["messages"])
    role_map = {r: r for r in ROLES}
    role_map.update({k.lower(): v for k, v in roles.items()})
    messages = _turns_to_messages(turns, cols["messages"], cols["role"], cols["content"], role_map, fixes)
    return _finish(messages, None, _tools(row, cols["tools"]), fixes, answered)


def from_text(row: dict, cols: dict, roles: dict, fixes: list, answered: bool = True) -> Conversation:
    return Conversation(text=_text(row, cols["text"]))


def from_prompt_completion(row: dict, cols: dict, roles: dict, fixes: list, answered: bool = True) -> Conversation:
    prompt = _text(row, cols["prompt"])
    completion = _text(row, cols["completion"], required=answered)
    answer = [] if completion is None else [{"role": "assistant", "content": completion}]
    return Conversation(messages=[{"role": "user", "content": prompt}, *answer],
                        system=_text(row, cols["system"], required=False) or None)


ADAPTERS: dict[str, Callable[..., Conversation]] = {
    "alpaca": from_alpaca, "sharegpt": from_sharegpt, "messages": from_messages,
    "text": from_text, "prompt_completion": from_prompt_completion,
}


def columns_for(fmt: str, overrides: Optional[dict] = None) -> dict[str, str]:
    """The column names of `fmt` with data.columns overrides applied (unknown names refused)."""
    if fmt in PREFERENCE_ONLY:
        raise UsageError(f"data.format={fmt} is a preference format: train it with train.objective=dpo, orpo, "
                         "simpo or kto (supervised formats: " + ", ".join(ADAPTERS) + ")")
    if fmt not in ADAPTERS:
        raise UsageError(f"unknown data format '{fmt}' (expected one of {', '.join(ADAPTERS)})")
    cols = dict(DEFAULT_COLUMNS[fmt])
    for k, v in (overrides or {}).items():
        if k not in cols:
            raise UsageError(f"data.columns: '{k}' is not a {fmt} column (expected one of {', '.join(cols)})")
        cols[k] = str(v)
    return cols


def to_conversation(row: Any, fmt: str, cols: dict, roles: Optional[dict] = None,
                    system_prompt: Optional[str] = None, fixes: Optional[list] = None,
                    answered: bool = True) -> Conversation:
    """One raw row -> Conversation, or BadRow. `fixes` collects counted repairs (see module doc).

    answered=False reads a row that may stop before its answer (a prompt to run, not an example
    to train on): the answer column (alpaca output, completion) is optional, and a dialogue is
    kept as it stands (no turn dropped or trimmed, no assistant turn needed)."""
    if not isinstance(row, dict):
        raise BadRow("wrong type", "row", f"expected an object, got {type(row).__name__}")
    conv = ADAPTERS[fmt](row, cols, roles or {}, fixes if fixes is not None else [], answered)
    if system_prompt and not conv.system and conv.text is None:
        conv.system = system_prompt
    return conv


# The column that gives a row's format away when none is configured (the MoE routing report reads
# rows of any format), in the order they are tried: chat formats before text before a bare prompt.
FORMAT_COLUMNS = (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca"),
                  ("text", "text"), ("prompt", "prompt_completion"))


def detect_format(row: dict) -> Optional[str]:
    """The format whose default column `row` fills (FORMAT_COLUMNS order), or None."""
    return next((fmt for col, fmt in FORMAT_COLUMNS if row.get(col) is not None), None)
