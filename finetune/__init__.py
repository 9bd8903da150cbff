"""finetune: QLoRA/LoRA fine-tuning of 3B-7B LLMs on one 12 GB GPU, on Lightning Fabric.

The Python API mirrors the CLI:

    import finetune
    cfg = finetune.load_config("tiny-lora", {"train.max_steps": "4", "out_dir": "/tmp/run"})
    adapter_dir = finetune.train(cfg)

Heavy libraries (torch, transformers) load only when a function needs them.
"""

from __future__ import annotations

import logging

# bitsandbytes logs a warning about an optional CPU 4-bit kernel on every import; the fallback
# it uses is correct, so the warning is only noise for users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from finetune.config import Config, load_config  # noqa: E402
from finetune.errors import FinetuneError, UsageError  # noqa: E402

__all__ = ["Config", "load_config", "train", "FinetuneError", "UsageError"]
__version__ = "0.1.0"


def train(config: "Config | str", **overrides):
    """Train from a Config (or a recipe name/path plus dotted overrides); return the final adapter dir."""
    from finetune.training import train as _train

    if isinstance(config, str):
        config = load_config(config, {k: str(v) for k, v in overrides.items()})
    return _train(config)
