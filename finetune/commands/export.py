"""`finetune export`: a model or adapter as one GGUF file plus an Ollama Modelfile.

    finetune export model=DIR|ALIAS out_dir=OUT [quant=f16|bf16|f32|q8_0]
    finetune export adapter=DIR [base=BASE] out_dir=OUT [quant=...]

The work is finetune.export.export (llama.cpp's converter, the Modelfile). An adapter's export
carries the fidelity report of the GGUF as transformers reads it back (the merged model that was
converted where it cannot; finetune.eval.fidelity: OUT/fidelity.json and one line;
fidelity.min_agreement gates it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from finetune.errors import UsageError
from finetune.eval import fidelity
from finetune.eval.fidelity import FidelitySettings
from finetune.export import Quant, export
from finetune.merge import BaseWeights, merge_base_weights

log = logging.getLogger(__name__)


@dataclass
class Args:
    model: Optional[str] = None
    """Model to export: a merged or MoE model dir, a local model dir, or an alias (smollm2-135m)."""
    adapter: Optional[str] = None
    """LoRA adapter dir to export: merged into its base first."""
    base: Optional[str] = None
    """With adapter=: merge into this base instead of the one the adapter records."""
    base_weights: BaseWeights = "auto"
    """With adapter=: merge into original or dequantized (NF4) base weights; auto = dequantized for an
    adapter trained on NF4 (see finetune merge)."""
    fidelity: FidelitySettings = field(default_factory=FidelitySettings)
    """Report comparing the merged model that is converted with the adapter as trained (adapter= only)."""
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
    weights = merge_base_weights(args.adapter, args.base_weights) if args.adapter else args.base_weights
    if not args.adapter and args.base_weights != "auto":
        raise UsageError("base_weights= applies to adapter=; a model is exported as it is")
    check = fidelity.plan(args.adapter, args.fidelity, args.out_dir, base=args.base)
    reports = []

    def measured(model_dir, gguf):
        # The GGUF as transformers reads it back (its f16/q8_0 rounding in the weights); where
        # transformers cannot read it, the merged model that went into the converter, said so.
        # llama.cpp's own kernels are compared by tests/test_export_llama_cpp.py.
        try:
            report = fidelity.measure(check, model_dir, candidate_name=f"{gguf.name} (dequantized by transformers)",
                                      label="gguf", gguf=gguf)
        except Exception as e:  # noqa: BLE001 - any reader failure falls back, and is reported
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            log.warning("fidelity: transformers cannot read %s (%s); reporting on the merged model instead", gguf.name, why)
            report = fidelity.measure(check, model_dir, candidate_name=f"merged model converted to {args.quant} GGUF")
            report["gguf_unreadable"] = why
        report["base_weights"] = weights
        reports.append(fidelity.write_report(report, None, args.fidelity))
        return report

    path = export(args.out_dir, model=args.model, adapter=args.adapter, base=args.base, quant=args.quant,
                  name=args.name, overwrite=args.overwrite, base_weights=weights,
                  check=None if check.skip else measured)
    name = path.name[: -len(f"-{args.quant}.gguf")]
    print(f"GGUF written to {path}; Ollama: cd {path.parent} && ollama create {name} -f Modelfile")
    if check.skip:
        print(f"fidelity: no report ({check.skip})")
        return 0
    print(fidelity.summary(reports[0], "gguf" if "gguf" in reports[0]["perplexity"] else "merged"))
    fidelity.apply_gate(reports[0], args.out_dir)
    return 0
