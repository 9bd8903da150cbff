"""The sub-commands of `finetune`, one module each: `finetune NAME key=value ...` runs
`finetune.commands.NAME`.

Each module holds only the command: `Args`, a dataclass whose field docstrings are its `--help`
(and whose types and `ranged` fields are every single-value check), and `run(args, cfg)`, which
checks what spans several fields and calls the stage that does the work. A field named `recipe`
makes the command take a training recipe: the CLI builds `cfg` from it and the other key=value
pairs. Stage rooms never import from here.

This module is only the registry, so listing the commands (`finetune --help`) imports nothing
heavy; `finetune.cli` imports a command's module only when that command runs.
"""

from __future__ import annotations

# name -> one-line description, in the order `finetune --help` lists them.
COMMANDS = {
    "data": "preview rendered examples and data statistics for a recipe",
    "eval": "score base models, adapters, merged and MoE checkpoints on a suite",
    "merge": "merge an adapter into its base, or combine several adapters",
    "moe": "assemble a Mixtral-style MoE from fine-tunes; routing report",
    "plan": "predict peak GPU memory for a recipe, and what fits a budget",
    "export": "write a model or adapter as one GGUF file and an Ollama Modelfile",
    "chat": "talk to an adapter or model you trained (streamed; /reset, /exit)",
}


def module_name(command: str) -> str:
    """The module that defines `command`'s Args and run."""
    return f"{__name__}.{command}"
