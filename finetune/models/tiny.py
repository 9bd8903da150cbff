"""A tiny random Llama and a byte-level tokenizer, saved to a real directory.

Tests and the `tiny-*` recipes train this in seconds. It lives on disk (not only in memory) so an
adapter's `base_model_name_or_path` always resolves and plain `AutoModelForCausalLM` loads it.

The tokenizer has no merges: token id = byte value + 3, after three special tokens, so tests can
write expected ids by hand: "Hi" -> [ord("H") + 3, ord("i") + 3].
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from finetune.data.templates import CHATML_TEMPLATE
from finetune.fs import CACHE_HINT, cache_root, write_error
from finetune.models.tiny_spec import BYTE_OFFSET, EOS, PAD, SPECIALS, TINY_CONFIG


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map, which the ByteLevel pre-tokenizer uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokenizer():
    """A PreTrainedTokenizerFast over raw bytes with ChatML specials (pad != eos)."""
    # Imported here, not at the top: transformers (and torch) take seconds, and only building needs them.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    b2u = _bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({b2u[b]: BYTE_OFFSET + b for b in range(256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=None, unk_token=None,
        model_max_length=TINY_CONFIG["max_position_embeddings"])
    fast.chat_template = CHATML_TEMPLATE
    return fast


def make_tiny_model(path: str | os.PathLike, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a random tiny causal LM + tokenizer to `path` (atomically) and return it."""
    # Imported here, not at the top: transformers (and torch) take seconds, and only building needs them.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    tok = byte_tokenizer()
    cfg_kwargs = dict(TINY_CONFIG, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=None)
    cfg_kwargs.update(overrides)
    config = AutoConfig.for_model(arch, **cfg_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init with std 0.02 gives near-uniform logits; a slightly larger head makes tiny
    # training runs move visibly in a few steps.
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        with write_error(path, CACHE_HINT):
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, path) if not path.exists() else shutil.rmtree(tmp)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiny_model_dir() -> Path:
    """The shared tiny Llama used by the `tiny` alias; built once per cache."""
    path = cache_root() / "models" / "tiny-llama-v1"
    if not (path / "config.json").is_file():
        make_tiny_model(path)
    return path
