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

import json
import re
from typing import Optional, Sequence

import numpy as np

from finetune.data.formats import BadRow, Conversation
from finetune.errors import FinetuneError, UsageError, did_you_mean

IGNORE = -100
TOOLS_PREAMBLE = "You have access to the following tools:\n"
# prompt_style=chatml: ChatML for tokenizers without a chat template of their own (the tiny one too).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class AlpacaStyle:
    """litgpt's Alpaca prompt (same text), without importing all of litgpt for it."""

    def apply(self, prompt: str, *, sys_prompt: Optional[str] = None, **kwargs) -> str:
        sys_prompt = sys_prompt or ("Below is an instruction that describes a task. "
                                    "Write a response that appropriately completes the request.\n\n")
        return f"{sys_prompt}### Instruction:\n{prompt}\n\n### Response:\n"


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


class Renderer:
    """Turns Conversations into (text, trained character spans) and then (input_ids, labels).

    `style` is 'template' (the tokenizer's chat template), 'chatml', or a litgpt prompt style
    name ('alpaca', 'llama3', ...) for base models without a template."""

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
        self.litgpt_style = None
        if style == "alpaca":
            self.litgpt_style = AlpacaStyle()
        elif style != "template":
            from litgpt.prompts import (
                prompt_styles,  # slow import (all of litgpt): only when asked for
            )

            if style not in prompt_styles:
                raise UsageError(f"unknown data.prompt_style '{prompt_style}'"
                                 f"{did_you_mean(style, ['auto', 'chatml', *prompt_styles])}")
            self.litgpt_style = prompt_styles[style]()
        self.template_tools = bool(self.template and re.search(r"\btools\b", self.template))
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

    # ------------------------------------------------------------------ rendering to text

    def _render(self, messages: list[dict], tools: Optional[list], generation: bool) -> str:
        # Not at the top: it imports torch, and this module must not (finetune.models.tiny takes
        # CHATML_TEMPLATE from here, and `finetune plan` imports that without torch).
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            out, _ = render_jinja_template(conversations=[messages], chat_template=self.template,
                                           add_generation_prompt=generation, tools=tools, **self.special_map)
        except Exception as e:  # jinja raise_exception(): e.g. roles must alternate, no tool role
            raise BadRow("template error", "", str(e).splitlines()[0][:120]) from None
        return out[0]

    def _chat(self, conv: Conversation) -> tuple[list[dict], Optional[list]]:
        msgs = conv.chat()
        tools = conv.tools
        if tools and not self.template_tools:
            # The template cannot place tools itself: describe them in the system prompt.
            desc = TOOLS_PREAMBLE + json.dumps(tools, ensure_ascii=False)
            if msgs and msgs[0]["role"] == "system":
                msgs[0] = {"role": "system", "content": msgs[0]["content"] + "\n\n" + desc}
            else:
                msgs.insert(0, {"role": "system", "content": desc})
            tools = None
        return msgs, tools

    def render(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """Full text and the character spans whose tokens are trained."""
        if conv.text is not None:
            text = self.bos + conv.text + self.eos
            return text, [(0, len(text))]
        if self.litgpt_style is not None:
            text, spans = self._render_litgpt(conv)
        else:
            msgs, tools = self._chat(conv)
            text = self._render(msgs, tools, False)
            spans = []
            for i, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                start = _lcp(self._render(msgs[:i], tools, True), text)
                end = len(text) if i == len(msgs) - 1 else _lcp(self._render(msgs[:i + 1], tools, False), text)
                seg = text[start:end]
                last = None
                if self.special_re is not None:
                    for last in self.special_re.finditer(seg):
                        pass
                end = start + (last.end() if last is not None else len(seg.rstrip()))
                if end > start:
                    spans.append((start, end))
        if self.train_on_prompt:
            spans = [(0, len(text))]
        return text, spans

    def _render_litgpt(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        system = conv.system
        if conv.tools:
            system = ((system + "\n\n") if system else "") + TOOLS_PREAMBLE + json.dumps(conv.tools, ensure_ascii=False)
        text, spans, pending = self.bos, [], []
        for m in conv.messages:
            if m["role"] == "assistant":
                prompt = "\n\n".join(pending)
                if text and not text.endswith(self.bos or "\0"):
                    text += "\n\n"  # keep turns apart after the previous eos
                text += (self.litgpt_style.apply(prompt, sys_prompt=system.rstrip("\n") + "\n\n") if system
                         else self.litgpt_style.apply(prompt))
                system, pending = None, []  # the system prompt is said once, before the first turn
                spans.append((len(text), len(text) + len(m["content"]) + len(self.eos)))
                text += m["content"] + self.eos
            else:
                pending.append(m["content"] if m["role"] != "tool" else f"Tool result:\n{m['content']}")
        return text, spans

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
        conv = Conversation(messages=msgs, system=conv.system, tools=conv.tools)
        if self.litgpt_style is not None:
            text, _ = self._render_litgpt(Conversation(messages=msgs + [{"role": "assistant", "content": ""}],
                                                       system=conv.system, tools=conv.tools))
            return text[:len(text) - len(self.eos)] if self.eos else text
        full, tools = self._chat(conv)
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
    """Tokens overlapping characters [a, b): two lookups instead of the whole offsets list."""
    first = enc.char_to_token(a) if a < n_chars else n_tokens
    if b >= n_chars:
        stop = n_tokens
    else:
        t = enc.char_to_token(b)
        stop = None if t is None else (t + 1 if enc.token_to_chars(t)[0] < b else t)
    if first is None or stop is None:  # a character no token covers (normalizer): use all offsets
        off = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        hit = np.flatnonzero((off[:, 0] < b) & (off[:, 1] > a))
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
