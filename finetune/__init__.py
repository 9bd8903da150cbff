"""finetune: QLoRA/LoRA fine-tuning of 3B-7B LLMs on one 12 GB GPU, on Lightning Fabric.

The Python API mirrors the CLI:

    import finetune
    cfg = finetune.load_config("tiny-lora", {"train.max_steps": "4", "out_dir": "/tmp/run"})
    adapter_dir = finetune.train(cfg)

Heavy libraries (torch, transformers) load only when a function needs them.
"""

from __future__ import annotations

import logging
from pathlib import Path

# bitsandbytes logs a warning about an optional CPU 4-bit kernel on every import; the fallback
# it uses is correct, so the warning is only noise for users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from finetune.config import Config, load_config  # noqa: E402
from finetune.errors import FinetuneError, UsageError  # noqa: E402

__all__ = ["Config", "load_config", "train", "FinetuneError", "UsageError"]
__version__ = "0.1.0"


def train(config: "Config | str", **overrides):
    """Train from a Config (or a recipe name/path plus dotted overrides); return the final adapter dir.

    What `finetune recipe=...` does: train, then, when the recipe names an `eval.suite`, score the
    adapter saved on disk against its base into out_dir/eval (the training model is freed first).
    With several processes only global rank 0 evaluates and gets the path; the others get None.
    """
    # Imported here, not at the top: `import finetune` (and so `finetune plan`) must not load torch.
    from finetune.eval.run import run_suite_after_training
    from finetune.eval.suites import load_suite
    from finetune.training.loop import train as train_adapter

    from finetune.fs import out_dir_lock

    if isinstance(config, str):
        config = load_config(config, overrides)
    if config.eval.suite:  # a bad suite is refused now, not after hours of training
        load_suite(config.eval.suite, max_new_tokens=config.eval.max_new_tokens)
    with out_dir_lock(config.out_dir):  # held through the eval suite, which writes out_dir/eval
        final_dir = train_adapter(config)
        if final_dir is not None and config.eval.suite:
            run_suite_after_training(config.eval.suite, final_dir, Path(config.out_dir) / "eval", cfg=config)
    return final_dir
