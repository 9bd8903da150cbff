"""Model and tokenizer loading, every one the project does: base models to train (bitsandbytes
quantization, LoRA via peft), plain models to merge into or to run prompts through, tokenizers.

Everything goes through transformers' and peft's own loaders so a saved adapter is a standard
PEFT adapter. This module adds name resolution (aliases, local dirs, hub ids), one-line errors for
the ways loading fails, and the checks that an adapter fits the base it is put on. Which dtypes
a model gets is finetune.runtime's decision."""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from finetune.config import Config, ModelConfig, QuantConfig
from finetune.errors import FinetuneError, UsageError, first_line
from finetune.models import embedded
from finetune.models.dtypes import no_cpu_repack, one_float_dtype, prepare_kbit, trained_in_fp32
from finetune.models.experts import keep_nf4_under_lora, quantize_fused_experts, unquantized_view
from finetune.models.tiny import tiny_model_dir
from finetune.portable import save_tokenizer
from finetune.runtime import (
    attention_implementation,
    base_dtype,
    compute_dtype,
    default_device,
    fsdp_param_dtype,
    inference_dtype,
    kbit_frozen_dtypes,
    lora_compute_dtype,
    storage_dtype,
)

log = logging.getLogger(__name__)

TINY_ALIAS = "tiny"
ALIASES = (TINY_ALIAS, embedded.ALIAS)

# Existing tokens that can serve as padding when the tokenizer has none (or pads with eos, which
# would teach the model to never stop if pad positions ever leak into the labels).
PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<|fim_pad|>",
                  "<|reserved_special_token_0|>", "<unk>")
NEW_PAD = "<|pad|>"


# --------------------------------------------------------------------------- names and devices


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or (os.name == "nt" and len(name) > 1 and name[1] == ":")


def resolve_model_path(name: str, revision: Optional[str] = None) -> str:
    """An alias, local directory or hub id -> what `from_pretrained` should be given.

    'tiny' -> the on-disk tiny Llama; 'smollm2-135m' -> the hub-cache copy of SmolLM2-135M-Instruct,
    else the embedded GGUF converted once; a local model directory -> its absolute path; anything
    else is returned unchanged as a hub id (the hub code path, offline from the hub cache).
    """
    name = str(name or "").strip()
    if not name:
        raise UsageError("model.name is empty: give a hub id, a local model directory, or an alias "
                         f"({', '.join(ALIASES)})")
    key = name.lower()
    if key == TINY_ALIAS:
        return str(tiny_model_dir())
    if key == embedded.ALIAS:
        return embedded.hub_cache_dir(revision) or str(embedded.embedded_model_dir())
    if name == embedded.HUB_ID and embedded.hub_cache_dir(revision) is None:
        return str(embedded.embedded_model_dir())

    path = Path(name).expanduser()
    if path.exists() or _looks_local(name):
        if not path.exists():
            raise UsageError(f"model path not found: {name}")
        if not path.is_dir():
            raise UsageError(f"model {name} is a file; give a model directory (with config.json), a hub id or an alias")
        if not (path / "config.json").is_file():
            if (path / "adapter_config.json").is_file():
                raise UsageError(f"{name} is a LoRA adapter, not a base model; use the base it was trained on "
                                 "(its adapter_config.json says which) or merge it first")
            raise UsageError(f"model directory {name} has no config.json")
        return os.path.abspath(path)

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise UsageError(f"model '{name}' is neither a local directory, an alias ({', '.join(ALIASES)}) "
                         "nor a valid hub id") from None
    return name


# --------------------------------------------------------------------------- errors from loaders


_HUB_USAGE = {
    "GatedRepoError": "model '{name}' is gated on the hub: accept its license on huggingface.co and log in (hf auth login)",
    "RepositoryNotFoundError": "model '{name}' not found on the hub and not a local directory",
    "RevisionNotFoundError": "revision '{revision}' of model '{name}' not found",
}
_OFFLINE = ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "ConnectError", "Timeout",
            "ConnectTimeout", "ReadTimeout")


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


@contextmanager
def loading_errors(name: str, revision: Optional[str] = None):
    """Turn what transformers raises while loading `name` into one line naming `name`."""
    try:
        yield
    except (FinetuneError, KeyboardInterrupt):
        raise
    except OSError as e:
        names = [type(x).__name__ for x in _chain(e)]
        for cls, msg in _HUB_USAGE.items():
            if cls in names:
                raise UsageError(msg.format(name=name, revision=revision)) from e
        text = " ".join(str(x) for x in _chain(e)).lower()
        local = Path(name).is_dir()
        if not local and (any(n in _OFFLINE for n in names) or "connect" in text or "offline" in text
                          or "can't load" in text or os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0")):
            raise FinetuneError(f"model '{name}' not found locally and the hub is unreachable") from e
        raise FinetuneError(f"cannot load model '{name}': {first_line(e)}") from e
    except RuntimeError as e:
        # huggingface_hub can end its retries on a dead network with "client has been closed".
        text = " ".join(str(x) for x in _chain(e)).lower()
        if not Path(name).is_dir() and any(w in text for w in ("client has been closed", "connect", "network")):
            raise FinetuneError(f"model '{name}' not found locally and the hub is unreachable") from e
        raise
    except (ValueError, ImportError, KeyError) as e:
        hint = " (set model.trust_remote_code=true only if you trust its code)" if "trust_remote_code" in str(e) else ""
        raise UsageError(f"cannot load model '{name}': {first_line(e)}{hint}") from e


def hub_kwargs(revision: Optional[str], trust_remote_code: bool) -> dict:
    kw = {}
    if revision:
        kw["revision"] = revision
    if trust_remote_code:  # passed only when on, so a default run never even names it
        log.warning("model.trust_remote_code=true: running model code shipped with the checkpoint")
        kw["trust_remote_code"] = True
    return kw


# --------------------------------------------------------------------------- tokenizer


def ensure_pad_token(tok) -> Optional[str]:
    """Make pad a token other than eos, preferring an existing unused special token.

    Returns the token added to the vocabulary when none existed (the model's embeddings must then
    cover it; `load_model` resizes them if needed), else None.
    """
    eos = tok.eos_token_id
    if tok.pad_token is not None and tok.pad_token_id != eos:
        return None
    vocab = tok.get_vocab()
    for cand in (*PAD_CANDIDATES, tok.unk_token):
        if cand and cand in vocab and vocab[cand] not in (eos, tok.bos_token_id):
            tok.pad_token = cand
            return None
    tok.add_special_tokens({"pad_token": NEW_PAD})
    log.warning("tokenizer has no usable pad token: added %s (id %d)", NEW_PAD, tok.pad_token_id)
    return NEW_PAD


def tokenizer_from(path: str, kw: dict, padding_side: str):
    with loading_errors(path, kw.get("revision")):
        tok = AutoTokenizer.from_pretrained(path, **kw)
    ensure_pad_token(tok)
    tok.padding_side = padding_side
    return tok


def load_tokenizer(model_cfg: Union[ModelConfig, str], padding_side: str = "right"):
    """The model's tokenizer with pad != eos; right padding (for training) unless asked otherwise."""
    if not isinstance(model_cfg, ModelConfig):
        model_cfg = ModelConfig(name=str(model_cfg))
    path = resolve_model_path(model_cfg.name, model_cfg.revision)
    return tokenizer_from(path, hub_kwargs(model_cfg.revision, model_cfg.trust_remote_code), padding_side)


def read_tokenizer(path: Union[str, Path]):
    """The tokenizer saved at `path` as it is, pad token untouched: to copy it next to a model, or
    only to encode text (nothing is padded)."""
    return AutoTokenizer.from_pretrained(str(path))


def copy_tokenizer(dest: Path, *sources: str) -> str:
    """Save the first loadable tokenizer among `sources` (an adapter dir first, then the base)."""
    for src in sources:
        if not src or (Path(src).is_dir() and not (Path(src) / "tokenizer_config.json").is_file()):
            continue
        try:
            save_tokenizer(read_tokenizer(src), dest)
            return src
        except (OSError, ValueError) as e:
            log.warning("tokenizer in %s not usable (%s); trying the next source", src, e)
    raise FinetuneError(f"no tokenizer found in {', '.join(map(str, sources))}")


# --------------------------------------------------------------------------- quantization


def _import_bnb():
    # Imported on first use, not at the top: bitsandbytes is needed only for quantized models and
    # may be missing or unable to load on a machine; that is a one-line error (see _probe_bnb).
    import bitsandbytes

    return bitsandbytes


_PROBED: dict = {}


def _probe_bnb(mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """Run one tiny quantized op on `device` so an unsupported setup fails now, in one line."""
    try:
        bnb = _import_bnb()
    except ImportError:
        raise FinetuneError(f"quant.mode={mode} needs bitsandbytes, which is not installed "
                            "(pip install bitsandbytes), or use quant.mode=none") from None
    key = (mode, device.type, dtype)
    if key in _PROBED:
        return
    # The probe runs once per process: with the global RNG it would shift the LoRA init of every
    # later run in the process, so the same seed would give another adapter on a second run.
    cuda = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            if mode == "nf4":
                w = torch.randn(64, 64, device=device, dtype=dtype)
                packed, state = bnb.functional.quantize_4bit(w, quant_type="nf4")
                bnb.functional.dequantize_4bit(packed, state)
            else:
                layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False).to(device)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    layer(torch.randn(2, 64, device=device, dtype=torch.float16))
    except Exception as e:
        raise FinetuneError(f"quant.mode={mode} cannot run on {device} with bitsandbytes "
                            f"{getattr(bnb, '__version__', '?')}: {first_line(e)}; use quant.mode=none") from e
    _PROBED[key] = True


def bnb_config(quant: Optional[QuantConfig], device: Union[str, torch.device],
               compute: torch.dtype = torch.float32, storage: torch.dtype = torch.uint8):
    """transformers BitsAndBytesConfig for `quant` (None for mode none), after probing the device."""
    if quant is None or quant.mode == "none":
        return None
    device = torch.device(device)
    _probe_bnb(quant.mode, device, compute)
    if quant.mode == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=quant.double_quant,
                                  bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=storage)
    # int8 matmuls cast fp32/bf16 inputs to fp16 and say so on every call (once per layer and
    # step: 28 lines for two steps of the tiny model): once per process is the news.
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Once) for f in bnb_log.filters):
        bnb_log.addFilter(_Once("MatMul8bitLt: inputs will be cast"))
    return BitsAndBytesConfig(load_in_8bit=True)


class _Once(logging.Filter):
    """Let the first record starting with `prefix` through, drop its repeats."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        seen, self.seen = self.seen, True
        return not seen


def quantized_modules(model: torch.nn.Module) -> list[str]:
    """Names of the bitsandbytes 4-bit/8-bit linear layers in `model` (empty when not quantized)."""
    try:
        bnb = _import_bnb()
    except ImportError:
        return []
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


# --------------------------------------------------------------------------- models


def _device_map(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"": device.index if device.index is not None else torch.cuda.current_device()}
    return {"": str(device)}


def load_pretrained(path: str, *, dtype: torch.dtype, device: torch.device, quant=None, revision=None,
                     trust_remote_code=False, attn_implementation: Optional[str] = None, nf4_experts: bool = False):
    """`path` as a transformers model in `dtype` on `device`, quantized per `quant` (a
    BitsAndBytesConfig or None). nf4_experts=True (quant is NF4) also stores the fused MoE expert
    stacks in NF4 (finetune.models.experts), packed onto `device` one stack at a time."""
    kw = hub_kwargs(revision, trust_remote_code)
    kw["dtype"] = dtype
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    staged = False
    if quant is not None:
        # bitsandbytes places weights while quantizing; device_map is how transformers is told where
        # (on CPU too: bitsandbytes >= 0.48 runs NF4/int8 there).
        kw["quantization_config"] = quant
        staged = nf4_experts and _experts_staged(path, kw, device)
        kw["device_map"] = _device_map(torch.device("cpu") if staged else device)
    with loading_errors(path, revision):
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    if nf4_experts:
        # A MoE for the device loads whole on the CPU (staged): fused expert stacks are no Linear,
        # so bitsandbytes would leave them all unpacked in `dtype` on the device (8 x 1B: 12.9 GB)
        # before they are packed. A device_map with only the experts on "cpu" is accepted by
        # transformers 5.3 only with llm_int8_enable_fp32_cpu_offload, and then accelerate's
        # dispatch_model makes those modules CPU-offloaded (meta parameters, hooks copying them to
        # the device on every forward), so the whole model loads on the CPU instead, each expert
        # stack is packed onto the device alone, and the rest (already quantized) follows.
        quantize_fused_experts(model, quant.bnb_4bit_compute_dtype, quant.bnb_4bit_use_double_quant,
                               device=device if staged else None)
    if staged:
        model.to(device)
        model.hf_device_map = _device_map(device)
    if quant is None and device.type != "cpu":
        model.to(device)
    return model


def _experts_staged(path: str, kw: dict, device: torch.device) -> bool:
    """Whether an NF4 load of `path` for `device` goes through the CPU (see load_pretrained): a
    device other than the CPU and a config with routed experts (fused into stacks in transformers 5)."""
    if device.type == "cpu":
        return False
    hub = {k: kw[k] for k in ("revision", "trust_remote_code") if k in kw}
    with loading_errors(path, kw.get("revision")):
        config = AutoConfig.from_pretrained(path, **hub)
    config = getattr(config, "text_config", None) or config
    return bool(getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0))


def load_inference_model(path: str, dtype: torch.dtype, device: Union[str, torch.device], nf4: bool = False):
    """A plain model in eval mode that only runs prompts (MoE hidden-mode gates, the routing
    report): in `dtype` on `device`; nf4=True stores its linear layers in NF4, computing in the
    inference dtype finetune.runtime decides for the device (raises if bitsandbytes cannot)."""
    device = torch.device(device)
    quant = bnb_config(QuantConfig(mode="nf4", double_quant=False), device,
                       compute=inference_dtype(str(device))) if nf4 else None
    return load_pretrained(str(path), dtype=dtype, device=device, quant=quant).eval()


def load_gguf(path: Union[str, Path], dtype: torch.dtype, device: Union[str, torch.device]):
    """A GGUF file as transformers reads it (`gguf_file=`): its tensors dequantized to `dtype` (the
    file's f16/q8_0 rounding, not llama.cpp's kernels), eval mode; ValueError if read only in part."""
    path = Path(path)
    with loading_errors(str(path)):
        model, info = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                           output_loading_info=True)
    if info.get("missing_keys"):  # freshly initialised, not the file's: never a fidelity candidate
        raise ValueError(f"transformers reads {len(info['missing_keys'])} weights of {path.name} as missing")
    return model.to(torch.device(device)).eval()


def load_full_precision(path: str):
    """The model at `path` in fp32 on CPU, never quantized: merges must not round through 4-bit storage."""
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None):
        raise UsageError(f"base {path} is stored quantized; merging needs its full-precision weights")
    return load_pretrained(path, dtype=torch.float32, device=torch.device("cpu"))


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct leaf names of the linear layers (what lora.target_modules matches against)."""
    kinds = [torch.nn.Linear]
    try:
        bnb = _import_bnb()
        kinds += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    except ImportError:
        pass
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, tuple(kinds)) and n}
    return sorted(names)


def lora_config(cfg: Config):
    """peft.LoraConfig from the recipe's lora section."""
    targets = list(cfg.lora.target_modules or [])
    params = list(getattr(cfg.lora, "target_parameters", None) or [])
    if not targets and not params:
        raise UsageError("lora.target_modules is empty: list module names, e.g. [q_proj,v_proj], or [all-linear]")
    if "all-linear" in targets and len(targets) > 1:
        raise UsageError(f"lora.target_modules {targets}: all-linear already covers every linear layer; use it alone")
    return PeftLoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        target_parameters=params or None,
        use_rslora=cfg.lora.use_rslora, use_dora=cfg.lora.use_dora,
        modules_to_save=list(cfg.lora.modules_to_save) or None, bias="none", task_type="CAUSAL_LM")


def load_model(cfg: Config, device: Union[str, torch.device, None] = None, tokenizer=None, *,
               gradient_checkpointing: bool = True):
    """The base model (quantized per cfg.quant) wrapped as a peft PeftModel, ready to train.

    Reads the model, quant, lora sections and the device/dtype policy of `cfg`, never its train
    section: the memory features are finetune.memory.apply's, the rest of a training step is
    finetune.training.build's. Only LoRA (and modules_to_save) parameters are trainable. The
    caller seeds the RNG first: the LoRA init draws from the global generator, so the same seed
    gives the same adapter.
    """
    device = torch.device(device) if device is not None else default_device(cfg.accelerator)
    m = cfg.model
    path = resolve_model_path(m.name, m.revision)
    if tokenizer is None:
        tokenizer = load_tokenizer(m)
    quant = bnb_config(cfg.quant, device, compute_dtype(cfg, device), storage_dtype(cfg, device))
    # fused MoE experts are no Linear: load_pretrained NF4s them itself, onto the device one at a time
    model = load_pretrained(path, dtype=base_dtype(cfg, device), device=device, quant=quant,
                             revision=m.revision, trust_remote_code=m.trust_remote_code,
                             attn_implementation=attention_implementation(cfg, device),
                             nf4_experts=quant is not None and cfg.quant.mode == "nf4")
    if quant is not None and not quantized_modules(model):
        raise FinetuneError(f"quant.mode={cfg.quant.mode} was requested but no layer of {m.name} was quantized")
    no_cpu_repack(model)
    sync_special_tokens(model, tokenizer)

    no_reentrant = {"use_reentrant": False}
    if quant is not None:
        model = prepare_kbit(model, kbit_frozen_dtypes(cfg, device), gradient_checkpointing, no_reentrant)
        if device.type == "cuda":  # loading's transient blocks are no training memory
            torch.cuda.empty_cache()
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=no_reentrant)
        model.enable_input_require_grads()
    model.config.use_cache = False

    lcfg = lora_config(cfg)
    try:
        with unquantized_view(model):
            model = _from_adapter(model, cfg) if m.adapter else get_peft_model(model, lcfg)
        keep_nf4_under_lora(model)
    except ValueError as e:
        text = str(e)
        if "arget module" in text or "not found in the base model" in text:
            raise UsageError(f"lora.target_modules {list(cfg.lora.target_modules)} matched no module of {m.name}; "
                             f"linear modules are: {', '.join(linear_module_names(model))}") from None
        raise UsageError(f"lora settings rejected by peft for {m.name}: {first_line(e)}") from e
    _check_modules_to_save(model, cfg)
    trained_in_fp32(model, lora_compute_dtype(cfg, device))
    if cfg.strategy == "fsdp":
        one_float_dtype(model, fsdp_param_dtype(cfg, device))
    return model


def _from_adapter(model, cfg: Config):
    """The base `model` with the adapter model.adapter loaded as the trained ("default") adapter
    (preflight checked it first: finetune.models.adapters.check_start_adapter)."""
    try:
        return PeftModel.from_pretrained(model, cfg.model.adapter, adapter_name="default", is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as e:  # e.g. a size mismatch: an adapter of another base
        raise UsageError(f"model.adapter {cfg.model.adapter} does not fit {cfg.model.name}: {first_line(e)}") from None


def _check_modules_to_save(model, cfg: Config) -> None:
    # peft silently ignores a modules_to_save name that matches nothing; a typo would then train
    # (and save) less than the recipe says.
    for name in cfg.lora.modules_to_save:
        if not any(n == name or n.endswith("." + name) for n, _ in model.base_model.model.named_modules()):
            raise UsageError(f"lora.modules_to_save: '{name}' matched no module of {cfg.model.name}")


def sync_special_tokens(model, tokenizer) -> None:
    """Make the model's pad id the tokenizer's, growing the embeddings if a pad token was added."""
    n_emb = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_emb:
        log.warning("resizing token embeddings %d -> %d for tokens added to the tokenizer", n_emb, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
