"""The data pipeline: format adapters -> tokenize/mask -> pack -> batch stream.

    from finetune.data import prepare, BatchStream, collate
    bundle = prepare(cfg.data, tokenizer, seed=cfg.train.seed)   # DataBundle(train, val, stats)

Attributes load lazily so `import finetune.data` stays cheap (no torch, no transformers).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Conversation": "formats", "BadRow": "formats", "to_conversation": "formats", "columns_for": "formats",
    "Renderer": "tokenize", "IGNORE": "tokenize", "fit_length": "tokenize", "check_pad": "tokenize",
    "use_chat_template": "tokenize", "dump_examples": "dump", "unpacked": "dump",
    "pack": "pack", "single_units": "pack", "make_units": "pack", "collate": "pack",
    "best_fit_bins": "pack", "packing_efficiency": "pack",
    "BatchStream": "stream",
    "Source": "sources", "resolve": "sources", "load_rows": "sources", "read_card": "sources",
    "prepare": "pipeline", "DataBundle": "pipeline", "DataStats": "pipeline",
    "load_conversations": "pipeline", "tokenize_conversation": "pipeline", "render_prompt": "pipeline",
    "get_renderer": "pipeline", "cache_key": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"finetune.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'finetune.data' has no attribute '{name}'")
