"""`finetune merge`: fold one LoRA adapter into its base, or combine several adapters into one.

    finetune merge adapter=DIR out_dir=OUT [dtype=auto|bf16|fp16|fp32] [base_weights=auto|original|dequantized]
    finetune merge adapters=[A,B] weights=[0.5,0.5] method=ties density=0.5 out_dir=OUT

The work is finetune.merge: merge_adapter (into the full-precision base) and combine_adapters
(peft's add_weighted_adapter). An adapter= merge is followed by its fidelity report
(finetune.eval.fidelity: OUT/fidelity.json and one line; fidelity.min_agreement gates it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from finetune.errors import UsageError
from finetune.eval import fidelity
from finetune.eval.fidelity import FidelitySettings
from finetune.merge import BaseWeights, Method, SignMethod, combine_adapters, merge_adapter, merge_base_weights
from finetune.ranges import parse_size, ranged


@dataclass
class Args:
    adapter: Optional[str] = None
    """Adapter directory to merge into its base (writes a full model)."""
    base: Optional[str] = None
    """Merge into this base instead of the one the adapter records (a moved base, a hub id for a path)."""
    adapters: Optional[list[str]] = None
    """Several adapter directories to combine into one new adapter (writes a PEFT adapter)."""
    weights: Optional[list[float]] = None
    """Weight per adapter when combining (default 1.0 each; negative subtracts)."""
    method: Method = "linear"
    """Combination method (peft add_weighted_adapter): linear, cat, svd, ties, ties_svd, dare_linear,
    dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd."""
    density: Optional[float] = ranged(None, gt=0, le=1)
    """Fraction of delta entries kept, in (0, 1]; needed by ties*, dare* and magnitude_prune*."""
    svd_rank: Optional[int] = ranged(None, ge=1, hint="(null = the largest input rank)")
    """Rank of the combined adapter for *svd methods (default: the largest input rank)."""
    majority_sign_method: SignMethod = "total"
    """ties/dare_ties sign election: total or frequency."""
    seed: int = ranged(0, ge=0, le=2**32 - 1)
    """Seed for the random pruning of dare* methods."""
    dtype: Literal["auto", "bf16", "fp16", "fp32", "bfloat16", "float16", "float32"] = "auto"
    """Dtype of the merged model: auto (the base's), bf16, fp16 or fp32. Merging itself runs in fp32."""
    base_weights: BaseWeights = "auto"
    """Full-precision weights the adapter is merged into: original (the base checkpoint's), dequantized
    (its NF4 weights dequantized: what a QLoRA adapter was trained against), auto (dequantized for an
    adapter trained on NF4, else original)."""
    fidelity: FidelitySettings = field(default_factory=FidelitySettings)
    """Report comparing the merged model with the adapter as trained (adapter= merges)."""
    max_shard_size: str = "2GB"
    """Largest safetensors shard of the merged model: 2GB, 500MiB or a number of bytes."""
    out_dir: str = "out/merged"
    """Where the merged model or combined adapter is written."""
    overwrite: bool = False
    """Replace an existing out_dir whole (an earlier output of a finetune command; a folder holding
    other files is refused)."""


def run(args: Args, cfg=None) -> int:
    if bool(args.adapter) == bool(args.adapters):
        raise UsageError("give exactly one of adapter=DIR (merge into the base) or adapters=[A,B,...] (combine)")
    shard_bytes = parse_size(args.max_shard_size, "max_shard_size")  # before any weight loads
    if args.adapter:
        weights = merge_base_weights(args.adapter, args.base_weights)
        check = fidelity.plan(args.adapter, args.fidelity, args.out_dir, base=args.base)  # before the merge
        merge_adapter(args.adapter, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
                      max_shard_size=shard_bytes, base=args.base, base_weights=weights)
        print(f"merged model written to {args.out_dir} (base_weights={weights})")
        if check.skip:
            print(f"fidelity: no report ({check.skip})")
            return 0
        report = fidelity.measure(check, args.out_dir)
        report["base_weights"] = weights
        fidelity.write_report(report, args.out_dir, args.fidelity)
        print(fidelity.summary(report))
        fidelity.apply_gate(report, args.out_dir)
    else:
        if args.base_weights != "auto":
            raise UsageError("base_weights= applies to adapter= merges; combining adapters touches no base weights")
        if args.base:
            raise UsageError("base= applies to adapter= merges; combined adapters keep their recorded base")
        if args.dtype != "auto":
            raise UsageError("dtype= applies to adapter= merges; a combined adapter keeps the adapters' dtype")
        combine_adapters(list(args.adapters), args.out_dir, weights=args.weights, method=args.method,
                         density=args.density, svd_rank=args.svd_rank,
                         majority_sign_method=args.majority_sign_method, seed=args.seed, overwrite=args.overwrite)
        print(f"combined adapter written to {args.out_dir}")
    return 0
