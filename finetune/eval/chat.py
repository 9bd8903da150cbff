"""Talk to what you trained (`finetune chat`): an adapter on its base quantized as in training,
or a merged / MoE model, with the chat template saved beside it and the system prompt it was
trained with, tokens streamed as they are generated.

Lines read from `stdin` are user turns; `/reset` forgets the conversation, `/exit` (or end of
input) ends it. Piped input is answered line by line, once each, so scripts and tests drive it
like a user. Prompts are rendered by the training renderer (finetune.data.pipeline.render_prompt),
so a turn looks to the model exactly as a training example did.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Optional, TextIO

import torch
from transformers import TextStreamer

from finetune.config import DataConfig
from finetune.data.formats import Conversation
from finetune.data.pipeline import render_prompt
from finetune.eval.generate import pad_id_of, stop_ids
from finetune.models.trained import load_as_trained, run_config
from finetune.runtime import inference_device, inference_dtype

COMMANDS_HELP = "/reset starts over, /exit ends (or end of input)"


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0


def chat_data_config(path: str, system: Optional[str]) -> DataConfig:
    """The run's data settings (prompt style, system prompt) with the template left to the saved
    tokenizer, which carries the one training used."""
    cfg = run_config(path)
    data = replace(cfg.data) if cfg is not None else DataConfig()
    data.chat_template = None
    if system is not None:
        data.system_prompt = system or None
    return data


class _Streamer(TextStreamer):
    """TextStreamer that writes to `out` (not print's sys.stdout at import time) and keeps the text."""

    def __init__(self, tokenizer, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out, self.text = out, ""

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.text += text
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


def chat(path: str, *, base: Optional[str] = None, system: Optional[str] = None, sampling: Sampling = Sampling(),
         device: str = "auto", stdin: TextIO = None, stdout: TextIO = None) -> list[str]:
    """Run the conversation; returns the answers given, in order."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    data_cfg = chat_data_config(path, system)
    dev = inference_device(device)
    model, tok = load_as_trained(path, dev, inference_dtype(str(dev)), base=base)
    model.eval()
    interactive = stdin.isatty()
    if interactive:
        stdout.write(f"chatting with {path} ({COMMANDS_HELP})\n")
    gen = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=pad_id_of(tok), eos_token_id=stop_ids(model, tok))
    if sampling.temperature > 0:
        gen.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
    else:  # greedy; unset the knobs a checkpoint's generation_config may carry
        gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    torch.manual_seed(sampling.seed)
    history: list[dict] = []
    answers: list[str] = []
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = []
            stdout.write("(conversation reset)\n")
            continue
        history.append({"role": "user", "content": text})
        ids = render_prompt(Conversation(messages=list(history), system=data_cfg.system_prompt), tok, data_cfg)
        streamer = _Streamer(tok, stdout)
        with torch.no_grad():
            model.generate(input_ids=torch.tensor([ids], device=dev),
                           attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=dev),
                           streamer=streamer, **gen)
        history.append({"role": "assistant", "content": streamer.text.strip()})
        answers.append(streamer.text)
    return answers
