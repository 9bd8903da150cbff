"""`finetune moe`: build a MoE from a config, or write a routing report for a built one.

    finetune moe config=moe.yaml out_dir=OUT          build the MoE (finetune.moe.build)
    finetune moe report=MOE_DIR data=FILE out_dir=DIR  per-layer routing report (finetune.moe.report)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from finetune.errors import UsageError
from finetune.fs import check_apart
from finetune.moe.build import build_moe
from finetune.moe.report import routing_report
from finetune.moe.spec import load_moe_config
from finetune.ranges import parse_size, ranged


@dataclass
class Args:
    config: Optional[str] = None
    """MoE YAML (mergekit-moe keys: base_model, gate_mode, dtype, experts_per_token, experts)."""
    report: Optional[str] = None
    """A MoE checkpoint directory to write a routing report for (instead of building one)."""
    data: Optional[str] = None
    """Report: a json/jsonl file (text, messages, prompt/completion, alpaca or sharegpt rows)."""
    max_rows: int = ranged(200, ge=1)
    """Report: use at most this many rows of `data`."""
    max_tokens: int = ranged(512, ge=1)
    """Report: truncate each row to this many tokens."""
    out_dir: str = "out/moe"
    """Where the MoE checkpoint (or the report's JSON + PNG) is written."""
    overwrite: bool = False
    """Replace an existing out_dir whole (an earlier output of a finetune command; a folder holding
    other files is refused)."""
    max_shard_size: str = "2GB"
    """Largest safetensors shard of the MoE checkpoint: 2GB, 500MiB or a number of bytes."""


def run(args: Args, cfg=None) -> int:
    if bool(args.config) == bool(args.report):
        raise UsageError("give exactly one of config=MOE.yaml (build) or report=MOE_DIR (routing report)")
    if args.report:
        if not args.data:
            raise UsageError("report= needs data=FILE (json/jsonl rows to route)")
        check_apart(args.out_dir, [("MoE model", args.report), ("data file", args.data)])
        res = routing_report(args.report, args.data, args.out_dir, max_rows=args.max_rows,
                             max_tokens=args.max_tokens, overwrite=args.overwrite)
        print(f"routing report written to {res['json']} and {res['png']}")
        return 0
    shard_bytes = parse_size(args.max_shard_size, "max_shard_size")
    spec = load_moe_config(args.config)
    check_apart(args.out_dir, [("MoE config", args.config), ("base model", spec.base_model)]
                + [("expert", e.adapter or e.source_model) for e in spec.experts])
    build_moe(spec, args.out_dir, overwrite=args.overwrite, max_shard_size=shard_bytes,
              config_text=Path(args.config).read_text())
    print(f"MoE ({len(spec.experts)} experts, top-{spec.experts_per_token}, gate_mode {spec.gate_mode}) "
          f"written to {args.out_dir}")
    return 0
