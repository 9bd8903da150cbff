"""`finetune data recipe=... [n=3]`: look at the training data before spending GPU hours.

Shows n rendered examples with the trained tokens highlighted, then the statistics: rows
loaded, rows dropped per reason, tokens, trained-token fraction, truncation, packing efficiency
(finetune.data.show). With dump=PATH every training example is also written to PATH as a JSON
line (see finetune.data.dump).

Preference objectives (train.objective=dpo|orpo|simpo|kto) prepare pairs (or KTO's labelled
answers, finetune.data.preference), which are shown and dumped as such: the prompt as context and
what counts of each answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rich.console import Console

from finetune.data.dump import check_dump_path, dump_examples
from finetune.data.show import show_data
from finetune.models.load import load_tokenizer
from finetune.ranges import ranged
from finetune.training.objectives import objective_for


@dataclass
class Args:
    recipe: Optional[str] = None
    """Recipe whose data section to preview (name from recipes/ or a path); data.* keys override it."""
    n: int = ranged(3, ge=0)
    """How many rendered training examples to show."""
    dump: Optional[str] = None
    """Write every training example (packing undone) to this file, one JSON object a line:
    text, input_ids, labels and trained (the decoded trained segments); for a preference objective
    one pair a line: prompt, chosen, rejected (or completion and label) decoded, and their ids."""


def run(args: Args, cfg) -> int:
    if args.dump:
        check_dump_path(args.dump)  # before the data is read: a bad path fails fast
    console = Console()
    tokenizer = load_tokenizer(cfg.model)  # the training tokenizer, pad token fixed as in training
    bundle = objective_for(cfg).prepare(tokenizer, progress=cfg.output.progress)  # what training would train on
    show_data(console, tokenizer, bundle, args.n)
    if args.dump:
        n = dump_examples(bundle.train, tokenizer, args.dump)
        console.print(f"wrote {n:,} training {bundle.stats.kind} to {args.dump}")
    return 0

