"""Files that load everywhere: what finetune writes must read the same under transformers 4.x and
5.x, and name its base model so that another machine can find it.

transformers 5 writes two things 4.x misreads, the second one silently:
- `tokenizer_config.json` names its internal class (`TokenizersBackend`), which 4.x refuses
  ("Tokenizer class TokenizersBackend does not exist"). `PreTrainedTokenizerFast` (tokenizer.json
  plus the special tokens) is a class both read the same.
- `config.json` keeps rope settings only inside `rope_parameters`; 4.x reads the top-level
  `rope_theta` / `rope_scaling` and, finding none, runs with its defaults (rope_theta 10000 where
  SmolLM2 has 100000, Llama-3.1 500000): different logits, no error. We write the legacy keys beside
  `rope_parameters`; transformers 5 reads `rope_parameters` first.

Adapters trained on a model that was resolved to a local copy (the embedded SmolLM2, a hub-cache
snapshot) record the hub id, not this machine's path (`record_hub_base`).

Every writer of model, MoE and adapter directories calls these after `save_pretrained`
(finetune.merge, finetune.moe, finetune.training.checkpoint, finetune.models.embedded).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Union

from finetune.fs import atomic_write

# The marker finetune.models.embedded writes into its converted copy; it names the hub id.
EMBEDDED_MARKER = "finetune-embedded.json"
# transformers 5's generic tokenizers-backed class, and the 4.x name of the same thing.
V5_ONLY_CLASS = "TokenizersBackend"
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
_HUB_SNAPSHOT = re.compile(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\][^/\\]+[/\\]?$")

PathLike = Union[str, Path]


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _write(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- config.json


def legacy_rope(config: dict) -> dict:
    """`config` (a config.json mapping) with top-level rope_theta/rope_scaling from rope_parameters.

    rope_scaling is what 4.x expects: the rope_parameters minus rope_theta, or null for the
    default (unscaled) rope. Existing top-level values are kept.
    """
    out = dict(config)
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return out
    if "rope_theta" in rope:
        out.setdefault("rope_theta", rope["rope_theta"])
    if "partial_rotary_factor" in rope:
        out.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling.get("rope_type", "default") == "default":
        scaling = None
    elif "type" not in scaling:  # 4.x before 4.45 read the key `type`
        scaling["type"] = scaling["rope_type"]
    out.setdefault("rope_scaling", scaling)
    return out


def portable_config(model_dir: PathLike) -> None:
    """Add the 4.x rope keys to model_dir/config.json (and every sub-config that has rope_parameters)."""
    f = Path(model_dir) / "config.json"
    data = _read(f)
    fixed = legacy_rope(data)
    for key, sub in data.items():
        if isinstance(sub, dict) and isinstance(sub.get("rope_parameters"), dict):
            fixed[key] = legacy_rope(sub)
    if fixed != data:
        _write(f, fixed)


# --------------------------------------------------------------------------- tokenizer files


def portable_tokenizer(out_dir: PathLike) -> None:
    """Make out_dir/tokenizer_config.json name a class transformers 4.x resolves.

    Only a config written next to a tokenizer.json is changed: `PreTrainedTokenizerFast` is that
    file plus the special tokens in the config, which is everything the 5.x backend class holds.
    A model-specific class (LlamaTokenizer, Qwen2Tokenizer) exists in both and is left alone.
    """
    d = Path(out_dir)
    f = d / "tokenizer_config.json"
    if not f.is_file() or not (d / "tokenizer.json").is_file():
        return
    data = _read(f)
    changed = False
    if data.get("tokenizer_class") == V5_ONLY_CLASS:
        data["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
        changed = True
    if data.pop("is_local", None) is not None:  # 5.x records where it loaded from: this machine's detail
        changed = True
    # 5.x may write extra_special_tokens as a list; 4.x expects a mapping name -> token.
    if isinstance(data.get("extra_special_tokens"), list):
        extra = data.pop("extra_special_tokens")
        if extra:
            data.setdefault("additional_special_tokens", extra)
        changed = True
    if changed:
        _write(f, data)


def save_tokenizer(tokenizer, out_dir: PathLike) -> None:
    """`tokenizer.save_pretrained(out_dir)`, then made readable by transformers 4.x."""
    tokenizer.save_pretrained(str(out_dir))
    portable_tokenizer(out_dir)


def portable_model_dir(model_dir: PathLike) -> None:
    """config.json and tokenizer files of a saved model directory, readable by 4.x and 5.x."""
    portable_config(model_dir)
    portable_tokenizer(model_dir)


# --------------------------------------------------------------------------- hub ids


def hub_id(name_or_path: str) -> str:
    """The hub id of a local copy of a hub model, else `name_or_path` unchanged.

    Knows finetune's embedded conversion (its marker names the id) and hub-cache snapshots
    (…/models--ORG--NAME/snapshots/REV). Any other local directory is recorded as given.
    """
    s = str(name_or_path)
    p = Path(s)
    marker = p / EMBEDDED_MARKER
    if marker.is_file():
        try:
            recorded = _read(marker).get("hub_id")
        except (OSError, ValueError):
            recorded = None
        if recorded:
            return str(recorded)
    m = _HUB_SNAPSHOT.search(s)
    if m and p.is_dir():
        return f"{m.group(1)}/{m.group(2)}"
    return s


def record_hub_base(adapter_dir: PathLike, base: Optional[str] = None) -> Optional[str]:
    """Rewrite an adapter's recorded base (adapter_config.json and the README's `base_model`) to
    `base`, or to the hub id of the local path peft recorded. Returns the recorded name."""
    d = Path(adapter_dir)
    f = d / "adapter_config.json"
    if not f.is_file():
        return None
    data = _read(f)
    old = data.get("base_model_name_or_path")
    new = base or (hub_id(old) if old else None)
    if not new or new == old:
        return old
    data["base_model_name_or_path"] = new
    _write(f, data)
    readme = d / "README.md"
    if old and readme.is_file():
        text = readme.read_text(encoding="utf-8")
        if old in text:
            atomic_write(readme, text.replace(old, new))
    return new
