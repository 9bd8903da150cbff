"""`finetune chat`: talk to what you trained, tokens streamed as they come.

    finetune chat adapter=out/run/final            an adapter on its base (NF4 where it was trained on one)
    finetune chat model=out/merged                 a merged or MoE model
    echo "What is the capital?" | finetune chat adapter=out/run/final temperature=0

Type /reset to start over, /exit (or Ctrl-D) to end. Piped lines are answered once each.
The work is finetune.eval.chat.chat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from finetune.errors import UsageError
from finetune.eval.chat import Sampling, chat
from finetune.models.adapters import read_adapter_config
from finetune.ranges import ranged


@dataclass
class Args:
    adapter: Optional[str] = None
    """LoRA adapter dir: loaded on its base, quantized as in training (its config.yaml says how)."""
    model: Optional[str] = None
    """A merged or MoE model dir, a local model dir, an alias (tiny, smollm2-135m) or a hub id."""
    base: Optional[str] = None
    """With adapter=: load it onto this base instead of the one it records."""
    system: Optional[str] = None
    """System prompt (default: the one the adapter was trained with; an empty string for none)."""
    max_new_tokens: int = ranged(256, ge=1)
    """Longest answer in tokens."""
    temperature: float = ranged(0.7, ge=0)
    """Sampling temperature; 0 = greedy (the same answer every time)."""
    top_p: float = ranged(0.9, gt=0, le=1)
    """Nucleus sampling mass (temperature > 0 only)."""
    seed: int = ranged(0, ge=0, le=2**32 - 1)
    """Sampling seed (a session with the same inputs repeats)."""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda, cuda:1, ..."""


def run(args: Args, cfg=None) -> int:
    if bool(args.adapter) == bool(args.model):
        raise UsageError("give exactly one of adapter=DIR (on its base) or model=DIR|ALIAS (merged, MoE or plain)")
    if args.base and not args.adapter:
        raise UsageError("base= applies to adapter=; a model is loaded as it is")
    if args.adapter:
        read_adapter_config(args.adapter)  # one line for a missing or wrong dir, before any load
    chat(args.adapter or args.model, base=args.base, system=args.system, device=args.device,
         sampling=Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed))
    return 0
