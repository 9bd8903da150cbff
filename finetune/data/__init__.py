"""The data pipeline: format adapters -> tokenize/mask -> pack -> batch stream.

    from finetune.data.pipeline import prepare
    from finetune.data.stream import BatchStream
    bundle = prepare(cfg.data, tokenizer, seed=cfg.train.seed)   # DataBundle(train, val, stats)

Modules: `sources` (where rows come from: dataset cards, files, the hub), `formats` (a row -> a
Conversation), `styles` and `templates` (prompt styles and built-in chat templates), `tokenize`
(render, tokenize, mask), `pack` (best-fit packing, collate), `pipeline` (all of it, cached),
`stream` (micro-batches per rank and step), `dump` (what is trained, as JSON lines). Import names
from the module that defines them; this package re-exports nothing.
"""
