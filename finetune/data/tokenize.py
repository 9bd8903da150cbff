"""Render a Conversation to text, tokenize it, and mask everything but the assistant turns.

How the mask is found (exact for any template, not only ChatML): the conversation is rendered
as a string, and for every assistant turn i the template is also rendered for the prefix
messages[:i] with the generation prompt and for messages[:i+1]; the difference is exactly what
the template emits for that turn (content + end-of-turn + any trailing separator). We train on it
up to and including its last special token (ChatML `<|im_end|>`, Llama-3 `<|eot_id|>`, Llama-2 /
Mistral `</s>`), so the model learns to stop but not the separator after the stop. The character
spans are mapped to tokens with the fast tokenizer's offsets, so BPE merges across span edges
cannot shift the mask.

The first label of every example is -100, so a pack never trains one example's last token to
predict the next example's first.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from finetune.data.formats import BadRow, Conversation
from finetune.data.styles import StyleRenderer, calls_as_text, tools_in_system
from finetune.data.templates import CHATML_TEMPLATE, NAMED_TEMPLATES
from finetune.errors import FinetuneError, UsageError, did_you_mean
from finetune.resources import read_user_text

IGNORE = -100


def _lcp(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def check_pad(tokenizer) -> None:
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is None:
        raise FinetuneError("tokenizer has no pad token; the model loader must add one distinct from eos")
    if pad == eos:
        raise FinetuneError(f"tokenizer pad token {tokenizer.pad_token!r} is the eos token; padding would be "
                            "indistinguishable from stopping (the model loader must set a distinct pad token)")


def chat_template_text(name: str, tokenizer=None) -> str:
    """data.chat_template -> jinja text: a file path, a built-in name (chatml), one of the
    tokenizer's own named templates (e.g. tool_use), or the jinja text itself."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict) and name in own:
        return own[name]
    if name in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[name]
    if "{{" in name or "{%" in name:
        return name
    path = Path(os.path.expanduser(name))
    if path.is_file():
        return read_user_text(path, "data.chat_template")
    names = [*NAMED_TEMPLATES, *(own if isinstance(own, dict) else {})]
    raise UsageError(f"data.chat_template: '{name}' is neither a file nor a named template "
                     f"(one of {', '.join(names)}){did_you_mean(name, names)}")


def use_chat_template(tokenizer, chat_template: Optional[str], prompt_style: str = "auto") -> None:
    """Set data.chat_template on the tokenizer itself, so the tokenizer saved with the adapter
    renders prompts at inference exactly as they were trained."""
    if not chat_template:
        return
    if (prompt_style or "auto") not in ("auto", "template"):
        raise UsageError(f"data.chat_template and data.prompt_style={prompt_style} both say how to render prompts; "
                         "set only one")
    text = chat_template_text(chat_template, tokenizer)
    if text == tokenizer.chat_template:  # set before (get_renderer runs per eval prompt)
        return
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        ImmutableSandboxedEnvironment().parse(text)
    except Exception as e:  # a template that cannot compile would fail on every row
        raise UsageError(f"data.chat_template: not a valid jinja template: {str(e).splitlines()[0][:160]}") from None
    tokenizer.chat_template = text


class Renderer:
    """Turns Conversations into (text, trained character spans) and then (input_ids, labels).

    `style` is 'template' (the tokenizer's chat template), 'chatml', or a litgpt prompt style
    name ('alpaca', 'llama3', ...) for base models without a template (see finetune.data.styles)."""

    def __init__(self, tokenizer, prompt_style: str = "auto", train_on_prompt: bool = False):
        check_pad(tokenizer)
        self.tokenizer = tokenizer
        self.train_on_prompt = train_on_prompt
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # named templates: the default one
            template = template.get("default") or next(iter(template.values()))
        style = prompt_style or "auto"
        if style == "auto":
            style = "template" if template else "alpaca"
        if style == "template" and not template:
            raise UsageError("data.prompt_style=template but the tokenizer has no chat template; "
                             "use data.prompt_style=alpaca, chatml or a litgpt prompt style")
        if style == "chatml":
            style, template = "template", CHATML_TEMPLATE
        self.style = style
        self.template = template if style == "template" else None
        # The tools a template can place and the calls it can render: otherwise the fallback.
        self.template_tools = bool(self.template and re.search(r"\btools\b", self.template))
        self.template_calls = bool(self.template and "tool_calls" in self.template)
        self.special_map = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        specials = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
        specials.update(s for s in tokenizer.all_special_tokens if s)
        specials.discard(tokenizer.pad_token)
        self.special_re = re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True)))) if specials else None
        self.eos = tokenizer.eos_token or ""
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        bos_id = tokenizer.bos_token_id
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        # Fallback styles build raw text, so they add the bos the tokenizer would have added.
        self.bos = tokenizer.bos_token if bos_id is not None and probe and probe[0] == bos_id else ""
        self.styled = None
        if style != "template":
            self.styled = StyleRenderer(_prompt_style(style, prompt_style), self.bos, self.eos, self.special_re)

    @property
    def used(self) -> str:
        """What renders prompts: the jinja text of the template, or the prompt style's name."""
        return self.template if self.template is not None else f"prompt_style:{self.style}"

    def tool_fallback(self, conv: Conversation) -> bool:
        """True when `conv` has tools or tool calls that this template cannot render itself."""
        calls = any(m.get("tool_calls") for m in conv.messages)
        return bool((conv.tools and not self.template_tools) or (calls and not self.template_calls))

    # ------------------------------------------------------------------ rendering to text

    def _render(self, messages: list[dict], tools: Optional[list], generation: bool) -> str:
        # Not at the top: it loads transformers and torch (seconds), which importing this module
        # for its names and checks need not.
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            out, _ = render_jinja_template(conversations=[messages], chat_template=self.template,
                                           add_generation_prompt=generation, tools=tools, **self.special_map)
        except Exception as e:  # jinja raise_exception(): e.g. roles must alternate, no tool role
            raise BadRow("template error", "", str(e).splitlines()[0][:120]) from None
        return out[0]

    def _chat(self, conv: Conversation) -> tuple[list[dict], Optional[list]]:
        """Messages for the template: tool calls structured when it renders them, else as JSON
        text; tools passed as `tools=` when it places them, else described in the system prompt."""
        system, tools = conv.system, conv.tools
        if tools and not self.template_tools:
            system, tools = tools_in_system(system, tools), None
        msgs = [{"role": "system", "content": system}] if system else []
        for m in conv.messages:
            out = {k: v for k, v in m.items() if k in ("role", "content", "name", "tool_call_id")}
            if m.get("tool_calls"):
                if self.template_calls:
                    out["tool_calls"] = m["tool_calls"]
                else:
                    out["content"] = calls_as_text(m)
            msgs.append(out)
        return msgs, tools

    def render(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """Full text and the character spans whose tokens are trained."""
        if conv.text is not None:
            text = self.bos + conv.text + self.eos
            return text, [(0, len(text))]
        if self.styled is not None:
            text, spans = self.styled.render(conv)
        else:
            msgs, tools = self._chat(conv)
            text = self._render(msgs, tools, False)
            spans = [s for i, m in enumerate(msgs) if m["role"] == "assistant"
                     for s in [self._turn_span(msgs, i, tools, text)] if s[1] > s[0]]
        if self.train_on_prompt:
            spans = [(0, len(text))]
        return text, spans

    def _turn_span(self, msgs: list[dict], i: int, tools: Optional[list], text: str) -> tuple[int, int]:
        """The characters of `text` that assistant turn i trains: what the template emits for it,
        up to and including its last special token (module doc)."""
        start = _lcp(self._render(msgs[:i], tools, True), text)
        end = len(text) if i == len(msgs) - 1 else _lcp(self._render(msgs[:i + 1], tools, False), text)
        seg = text[start:end]
        last = None
        if self.special_re is not None:
            for last in self.special_re.finditer(seg):
                pass
        return start, start + (last.end() if last is not None else len(seg.rstrip()))

    def render_answer(self, conv: Conversation) -> tuple[str, tuple[int, int]]:
        """Full text of `conv`, whose last message is an assistant turn, and the character span
        SFT trains for that last turn alone (preference data: one answer after a prompt), without
        rendering the spans of the earlier turns."""
        if self.styled is not None:
            text, spans = self.styled.render(conv)
            return text, spans[-1] if spans else (len(text), len(text))
        msgs, tools = self._chat(conv)
        text = self._render(msgs, tools, False)
        return text, self._turn_span(msgs, len(msgs) - 1, tools, text)

    def prompt_text(self, conv_or_messages) -> str:
        """The prompt up to and including the assistant generation header."""
        conv = conv_or_messages
        if not isinstance(conv, Conversation):
            msgs = list(conv)
            system = msgs.pop(0)["content"] if msgs and msgs[0]["role"] == "system" else None
            conv = Conversation(messages=msgs, system=system)
        msgs = list(conv.messages)
        while msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
        if self.styled is not None:  # the text before an (empty) answer
            text, spans = self.styled.render(Conversation(messages=msgs + [{"role": "assistant", "content": ""}],
                                                          system=conv.system, tools=conv.tools))
            return text[:spans[-1][0]]
        full, tools = self._chat(Conversation(messages=msgs, system=conv.system, tools=conv.tools))
        return self._render(full, tools, True)

    # ------------------------------------------------------------------ tokens and labels

    def encode(self, texts: Sequence[str], spans: Sequence[list[tuple[int, int]]],
               as_numpy: bool = False) -> list[tuple[list[int], list[int]]]:
        """Tokenize rendered texts (batched) and label the tokens overlapping the trained spans."""
        out = []
        if self.backend is not None:
            encs = self.backend.encode_batch(list(texts), add_special_tokens=False)
            for enc, text, sp in zip(encs, texts, spans):
                ids = np.asarray(enc.ids, dtype=np.int64)
                labels = np.full(len(ids), IGNORE, dtype=np.int64)
                for a, b in sp:
                    first, stop = _token_range(enc, a, b, len(text), len(ids))
                    labels[first:stop] = ids[first:stop]
                if len(labels):
                    labels[0] = IGNORE
                out.append((ids, labels) if as_numpy else (ids.tolist(), labels.tolist()))
            return out
        for text, sp in zip(texts, spans):  # slow tokenizer: tokenize span by span
            ids, labels, pos = [], [], 0
            for a, b in list(sp) + [(len(text), len(text))]:
                for lo, hi, trained in ((pos, a, False), (a, b, True)):
                    if hi > lo:
                        piece = self.tokenizer(text[lo:hi], add_special_tokens=False)["input_ids"]
                        ids += piece
                        labels += piece if trained else [IGNORE] * len(piece)
                pos = b
            if labels:
                labels[0] = IGNORE
            out.append((np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)) if as_numpy else (ids, labels))
        return out

    def tokenize(self, conv: Conversation) -> tuple[list[int], list[int]]:
        text, spans = self.render(conv)
        return self.encode([text], [spans])[0]


def _token_range(enc, a: int, b: int, n_chars: int, n_tokens: int) -> tuple[int, int]:
    """Tokens starting in characters [a, b): two lookups instead of the whole offsets list.

    A token that starts before `a` is not trained even when it reaches into the span: when an
    answer starts with whitespace, BPE merges the header's last newline with it, and training
    that token would train a character of the prompt."""
    first = enc.char_to_token(a) if a < n_chars else n_tokens
    if first is not None and first < n_tokens and enc.token_to_chars(first)[0] < a:
        first += 1
    if b >= n_chars:
        stop = n_tokens
    else:
        t = enc.char_to_token(b)
        stop = None if t is None else (t + 1 if enc.token_to_chars(t)[0] < b else t)
    if first is None or stop is None:  # a character no token covers (normalizer): use all offsets
        off = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        hit = np.flatnonzero((off[:, 0] < b) & (off[:, 0] >= a) & (off[:, 1] > a))
        return (int(hit[0]), int(hit[-1]) + 1) if len(hit) else (0, 0)
    return first, stop


def fit_length(ids: list[int], labels: list[int], seq_len: int, mode: str) -> tuple[list[int], list[int], bool]:
    """Apply the over-length policy; raise BadRow when the example must go."""
    truncated = False
    if len(ids) > seq_len:
        if mode == "drop":
            raise BadRow("too long", "", f"{len(ids)} > seq_len {seq_len}")
        ids, labels, truncated = ids[:seq_len], labels[:seq_len], True
    if all(x == IGNORE for x in labels):
        raise BadRow("no trained tokens after truncation" if truncated else "no trained tokens")
    return ids, labels, truncated


def _prompt_style(style: str, asked: str):
    """A prompt style object by name: alpaca is ours (litgpt's text), the rest litgpt's."""
    from finetune.data.styles import AlpacaStyle

    if style == "alpaca":
        return AlpacaStyle()
    from litgpt.prompts import prompt_styles  # slow import (all of litgpt): only when asked for

    if style not in prompt_styles:
        raise UsageError(f"unknown data.prompt_style '{asked}'{did_you_mean(style, ['auto', 'chatml', *prompt_styles])}")
    return prompt_styles[style]()
