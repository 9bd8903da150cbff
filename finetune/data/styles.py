"""Prompt styles for base models without a chat template, each rendering a whole conversation.

`alpaca` is the Stanford Alpaca template (github.com/tatsu-lab/stanford_alpaca, README "Data
Release"), byte for byte, with its input variant; litgpt's `alpaca` style is the same text. A
multi-turn conversation says the preamble (or the conversation's system prompt) once, then one
`### Instruction:` / `### Response:` block per turn, each answer followed by eos.

litgpt styles that render a list of messages (llama3, r1-base) get the whole conversation as
such a list, so `<|begin_of_text|>` and the system prompt appear once. Styles that render a
single prompt only (most of them) repeat their prompt per turn: for multi-turn data use a chat
template instead (data.chat_template=chatml or a jinja file), see docs/data-formats.md.

Tools and tool calls have no place in these styles: the tool schemas go into the system prompt,
a call is the JSON text {"name", "arguments"}, a tool result is a user turn "Tool result:\\n...".
"""

from __future__ import annotations

import json
from typing import Optional

from finetune.data.formats import Conversation

TOOLS_PREAMBLE = "You have access to the following tools:\n"
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n")


class AlpacaStyle:
    """litgpt's Alpaca prompt (the same text, input variant included), without importing litgpt."""

    def apply(self, prompt: str, *, sys_prompt: Optional[str] = None, **kwargs) -> str:
        if kwargs.get("input"):
            return f"{sys_prompt or ALPACA_INPUT}### Instruction:\n{prompt}\n\n### Input:\n{kwargs['input']}\n\n### Response:\n"
        return f"{sys_prompt or ALPACA_NO_INPUT}### Instruction:\n{prompt}\n\n### Response:\n"


def calls_as_text(message: dict) -> str:
    """The fallback for a template without tool-call support: the calls as JSON lines after the text."""
    calls = [json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False)
             for c in message.get("tool_calls") or []]
    return "\n".join(([message["content"]] if message.get("content") else []) + calls)


def tools_in_system(system: Optional[str], tools: Optional[list]) -> Optional[str]:
    """The fallback for a template without tool support: the schemas described in the system prompt."""
    if not tools:
        return system
    return ((system + "\n\n") if system else "") + TOOLS_PREAMBLE + json.dumps(tools, ensure_ascii=False)


def _user_text(m: dict) -> str:
    return m["content"] if m["role"] != "tool" else f"Tool result:\n{m['content']}"


class StyleRenderer:
    """Renders Conversations with a prompt style: (text, trained character spans)."""

    def __init__(self, style, bos: str, eos: str, special_re=None):
        self.style, self.eos, self.special_re = style, eos, special_re
        probe = style.apply([{"role": "user", "content": "\x00"}]) if not isinstance(style, AlpacaStyle) else None
        self.as_list = isinstance(probe, str) and "\x00" in probe and "'role'" not in probe
        first = style.apply("\x00") if not isinstance(style, AlpacaStyle) else ""
        self.bos = "" if bos and first.startswith(bos) else bos  # the style may say bos itself
        if self.as_list:
            after = style.apply([{"role": "user", "content": "\x00"}, {"role": "assistant", "content": "\x01"}])
            after = after[after.rindex("\x01") + 1:]  # the assistant turn's end + the next generation header
            m = special_re.search(after) if special_re is not None else None
            self.close = after[:m.end()] if m is not None else ""
            self.header = after[len(self.close):]

    def render(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        system = tools_in_system(conv.system, conv.tools)
        msgs = [m if m["role"] != "assistant" else {"role": "assistant", "content": calls_as_text(m)}
                for m in conv.messages]
        if self.as_list:
            return self._render_list(msgs, system)
        if isinstance(self.style, AlpacaStyle):
            return self._render_alpaca(msgs, system)
        text, spans, pending = self.bos, [], []
        for m in msgs:
            if m["role"] == "assistant":
                if text and not text.endswith(self.bos or "\0"):
                    text += "\n\n"  # keep turns apart after the previous eos
                prompt = "\n\n".join(pending)
                text += (self.style.apply(prompt, sys_prompt=system.rstrip("\n") + "\n\n") if system
                         else self.style.apply(prompt))
                system, pending = None, []
                spans.append((len(text), len(text) + len(m["content"]) + len(self.eos)))
                text += m["content"] + self.eos
            else:
                pending.append(_user_text(m))
        return text, spans

    def _render_alpaca(self, msgs: list[dict], system: Optional[str]) -> tuple[str, list[tuple[int, int]]]:
        with_input = any(m.get("input") for m in msgs)
        text = self.bos + (system.rstrip("\n") + "\n\n" if system else ALPACA_INPUT if with_input else ALPACA_NO_INPUT)
        spans, pending = [], []
        for m in msgs:
            if m["role"] != "assistant":
                pending.append(m)
                continue
            if spans:
                text += "\n\n"  # after the previous answer's eos
            last = pending[-1] if pending else {}
            prompt = "\n\n".join(_user_text(p) for p in pending[:-1])
            if last.get("input"):
                prompt = (prompt + "\n\n" if prompt else "") + last["instruction"]
                text += f"### Instruction:\n{prompt}\n\n### Input:\n{last['input']}\n\n### Response:\n"
            else:
                prompt = "\n\n".join(_user_text(p) for p in pending)
                text += f"### Instruction:\n{prompt}\n\n### Response:\n"
            pending = []
            spans.append((len(text), len(text) + len(m["content"]) + len(self.eos)))
            text += m["content"] + self.eos
        return text, spans

    def _render_list(self, msgs: list[dict], system: Optional[str]) -> tuple[str, list[tuple[int, int]]]:
        chat = ([{"role": "system", "content": system}] if system else [])
        chat += [{"role": m["role"] if m["role"] != "tool" else "user", "content": _user_text(m)} for m in msgs]
        full = self.style.apply(chat)
        text = self.bos + (full[:len(full) - len(self.header)] if self.header and full.endswith(self.header) else full)
        spans = []
        for i, m in enumerate(chat):
            if m["role"] != "assistant":
                continue
            before, upto = self.style.apply(chat[:i]), self.style.apply(chat[:i + 1])
            turn = upto[len(before):len(upto) - len(self.header)]
            start = len(self.bos) + len(before)
            spans.append((start, start + len(turn)))
        return text, spans
