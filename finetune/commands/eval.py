"""`finetune eval`: score base models, adapters, merged and MoE checkpoints on one suite.

    finetune eval suite=tiny models=[base,out/tiny-lora/final] out_dir=out/eval
    finetune eval suite=tiny-pref models=[base,out/sft/final,out/dpo/final] reference=out/sft/final

The work is finetune.eval.run.evaluate; with recipe= its data settings render the prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from finetune.config import Config
from finetune.errors import UsageError
from finetune.eval.run import evaluate
from finetune.ranges import ranged
from finetune.resources import list_resources


@dataclass
class Args:
    suite: Optional[str] = None
    """Eval suite: a name from eval/ (tiny, demo, alpaca-heldout, ...) or a path to a suite YAML."""
    models: list[str] = field(default_factory=lambda: ["base"])
    """Checkpoints to compare, as columns: base (the adapters' base model, else the recipe's
    model.name), adapter dirs, merged or MoE model dirs, hub ids or aliases. E.g.
    [base,out/run/final,out/merged]."""
    out_dir: str = "out/eval"
    """Where scores.json, scores.md, scores.png and generations/ go."""
    recipe: Optional[str] = None
    """Training recipe whose data settings (system_prompt, prompt_style) render the chat prompts, so
    they match training, and whose model.name is `base` when no adapter is given; data.* keys can
    be overridden too."""
    base_model: Optional[str] = None
    """The base model, when it cannot be read from an adapter (or to check adapters against it)."""
    base: Optional[str] = None
    """Load every adapter onto this base instead of the one it records (a moved base, a hub id)."""
    reference: Optional[str] = None
    """Preference tasks: the reference rewards are measured against, instead of the suite's: base
    (the base model, no adapter) or an adapter dir (e.g. the SFT adapter a DPO run started from)."""
    data: Optional[str] = None
    """Replace every task's data: a local file (e.g. ../shared/data/alpaca/alpaca_cleaned_1000.json)
    or a dataset card; the task's format applies."""
    n: Optional[int] = ranged(None, ge=1, hint="(null = every row)")
    """Use at most this many rows per task."""
    max_new_tokens: Optional[int] = ranged(None, ge=1)
    """Override the suite's generation length."""
    batch_size: Optional[int] = ranged(None, ge=1)
    """Override the batch size of loss, choice and generation batches."""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda, cuda:1, ..."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16."""
    overwrite: bool = False
    """Allow writing into an out_dir that already holds a scorecard."""
    progress: bool = True
    """Show progress bars."""


def run(args: Args, cfg: Optional[Config] = None) -> int:
    if not args.suite:
        raise UsageError(f"no suite given: finetune eval suite=NAME models=[...]; suites: "
                         f"{', '.join(list_resources('eval'))}")
    evaluate(args.suite, args.models, args.out_dir, data_cfg=cfg.data if cfg is not None else None,
             base_model=args.base_model, base=args.base, data=args.data, n=args.n,
             max_new_tokens=args.max_new_tokens,
             batch_size=args.batch_size, device=args.device, dtype=args.dtype, overwrite=args.overwrite,
             show=args.progress, seed=cfg.train.seed if cfg is not None else 42,
             recipe_model=cfg.model.name if cfg is not None and args.recipe else None, reference=args.reference)
    return 0
