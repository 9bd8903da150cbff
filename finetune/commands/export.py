"""`finetune export`: a model or adapter as one GGUF file plus an Ollama Modelfile.

    finetune export model=DIR|ALIAS out_dir=OUT [quant=f16|bf16|f32|q8_0]
    finetune export adapter=DIR [base=BASE] out_dir=OUT [quant=...]

The work is finetune.export.export (llama.cpp's converter, the Modelfile).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from finetune.export import Quant, export


@dataclass
class Args:
    model: Optional[str] = None
    """Model to export: a merged or MoE model dir, a local model dir, or an alias (smollm2-135m)."""
    adapter: Optional[str] = None
    """LoRA adapter dir to export: merged into its base first."""
    base: Optional[str] = None
    """With adapter=: merge into this base instead of the one the adapter records."""
    quant: Quant = "f16"
    """GGUF tensor type: f16, bf16, f32 or q8_0 (8-bit, about half the size of f16)."""
    name: Optional[str] = None
    """Model name: the GGUF file is NAME-QUANT.gguf (default: out_dir's name)."""
    out_dir: str = "out/export"
    """Where the .gguf file and the Modelfile are written."""
    overwrite: bool = False
    """Replace an existing out_dir whole (an earlier output of a finetune command; a folder holding
    other files is refused)."""


def run(args: Args, cfg=None) -> int:
    path = export(args.out_dir, model=args.model, adapter=args.adapter, base=args.base, quant=args.quant,
                  name=args.name, overwrite=args.overwrite)
    name = path.name[: -len(f"-{args.quant}.gguf")]
    print(f"GGUF written to {path}; Ollama: cd {path.parent} && ollama create {name} -f Modelfile")
    return 0
