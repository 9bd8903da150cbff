"""Routing report for a Mixtral-architecture MoE: which experts the router picks, layer by layer.

    finetune moe report=MOE_DIR data=rows.jsonl out_dir=DIR

For every layer and expert: `utilisation` = fraction of tokens whose top-k includes the expert
(a row sums to k), `top1_share` = fraction of tokens whose first choice is the expert (a row sums
to 1), and `mean_prob` = the mean router probability. Written as routing.json plus routing.png
(heatmaps of utilisation and top-1 share). Rows are routed one at a time, so no padding token is
ever counted. Rows are read and turned into conversations by finetune.data (the reader and the
format adapters training uses, the format told by each row's columns; an answer is optional), and
conversations go through the model's chat template, as in training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from matplotlib.figure import Figure
from transformers import AutoConfig

from finetune.data.formats import BadRow, columns_for, detect_format, to_conversation
from finetune.data.rows import read_json_rows
from finetune.errors import UsageError
from finetune.fs import atomic_out_dir, check_out_dir, out_dir_lock, write_error
from finetune.manifest import check_input
from finetune.models.load import load_inference_model, read_tokenizer
from finetune.moe.routing import router_probs
from finetune.runtime import inference_device


def read_rows(path: str, max_rows: Optional[int] = None) -> list:
    """The rows of a JSON or JSON Lines file (finetune.data.rows says what it may hold), at most max_rows."""
    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise UsageError(f"report data file not found: {path}")
    rows = read_json_rows(p, "report data").rows
    if not rows:
        raise UsageError(f"{path} holds no rows")
    return rows[:max_rows] if max_rows else rows


def _check_row(row: dict) -> None:
    """Refuse a row whose known fields have the wrong form (a number for text, a turn that is no
    object), naming the field: routing it would fail deep inside the tokenizer."""
    for key in ("messages", "conversations"):
        turns = row.get(key)
        if turns is not None and not (isinstance(turns, list) and all(
                isinstance(m, dict) and all(isinstance(m.get(f, ""), str) for f in ("role", "content", "from", "value"))
                for m in turns)):
            raise UsageError(f"report row field '{key}' must be a list of turns with string fields: {str(turns)[:60]}")
    for key in ("instruction", "input", "output", "text", "prompt", "completion", "response"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise UsageError(f"report row field '{key}' must be a string, got {type(row[key]).__name__}")


def row_text(row, tokenizer) -> str:
    """One row -> the text the model would see: a row of any training format (finetune.data.formats,
    the format told by its columns) through the chat template when it is a conversation and the
    tokenizer has one; an answer is optional (report rows are often eval prompts)."""
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        raise UsageError(f"report rows must be strings or objects, got {type(row).__name__}")
    _check_row(row)
    fmt = detect_format(row)
    if fmt is None:
        raise UsageError(f"report row has none of text, messages, conversations, instruction, prompt: {list(row)[:5]}")
    try:
        conv = to_conversation(row, fmt, columns_for(fmt), answered=False)
    except BadRow as e:
        field_part = f" field '{e.field}'" if e.field else ""
        raise UsageError(f"report row{field_part} {e.reason}{': ' + e.detail if e.detail else ''}") from None
    if conv.text is not None:
        return conv.text
    messages = conv.chat()
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tools=conv.tools, tokenize=False)
    return "\n\n".join(str(m.get("content", "")) for m in messages)


def routing_stats(model, tokenizer, texts: list[str], max_tokens: int = 512) -> dict:
    """Per layer and expert: top-k utilisation, top-1 share and mean router probability."""
    cfg = model.config
    L, E, k = cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok
    util = torch.zeros(L, E)
    top1 = torch.zeros(L, E)
    prob = torch.zeros(L, E)
    tokens = 0
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_tokens)["input_ids"]
            if not ids:
                continue
            out = model(input_ids=torch.tensor([ids], device=device), output_router_logits=True, use_cache=False)
            for li, layer_out in enumerate(out.router_logits):
                p = router_probs([layer_out]).cpu()
                sel = torch.topk(p, k, dim=-1).indices
                util[li] += torch.nn.functional.one_hot(sel, E).sum((0, 1)).float()
                top1[li] += torch.nn.functional.one_hot(sel[:, 0], E).sum(0).float()
                prob[li] += p.sum(0)
            tokens += len(ids)
    if tokens == 0:
        raise UsageError("report data produced no tokens")
    return {"layers": L, "experts": E, "top_k": k, "tokens": tokens, "rows": len(texts),
            "utilisation": (util / tokens).tolist(), "top1_share": (top1 / tokens).tolist(),
            "mean_prob": (prob / tokens).tolist()}


def plot_heatmap(stats: dict, path: Path, expert_names: Optional[list[str]] = None) -> None:
    # A bare Figure, not pyplot: no global backend switch in the caller's process, nothing to close.
    E, L = stats["experts"], stats["layers"]
    fig = Figure(figsize=(4 + 1.2 * E, 1.5 + 0.3 * L))
    axes = fig.subplots(1, 2, squeeze=False)
    for ax, key, title, vmax in ((axes[0][0], "utilisation", f"top-{stats['top_k']} utilisation", stats["top_k"]),
                                 (axes[0][1], "top1_share", "top-1 share", 1.0)):
        im = ax.imshow(stats[key], aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(title)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_xticks(range(E))
        ax.set_xticklabels([Path(n).name[:12] for n in expert_names] if expert_names else range(E),
                           rotation=45, ha="right")
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"routing over {stats['tokens']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def routing_report(moe_dir: str, data: str, out_dir: str, max_rows: Optional[int] = 200,
                   max_tokens: int = 512, overwrite: bool = False) -> dict:
    """Route `data` through the MoE at `moe_dir`; write routing.json + routing.png into out_dir."""
    d = Path(os.path.expanduser(moe_dir))
    if not (d / "config.json").is_file():
        raise UsageError(f"report: {moe_dir} is not a model directory (no config.json)")
    cfg = AutoConfig.from_pretrained(d)
    if not getattr(cfg, "num_local_experts", None):
        raise UsageError(f"report: {moe_dir} is a {cfg.model_type} model, not a MoE (no num_local_experts)")
    check_out_dir(out_dir, overwrite, whole=True)
    check_input(d, "report")
    rows = read_rows(data, max_rows)
    with out_dir_lock(out_dir):  # one writer per out_dir, as training
        return _report(d, data, out_dir, rows, max_tokens, overwrite)


def _report(d: Path, data: str, out_dir: str, rows, max_tokens: int, overwrite: bool) -> dict:
    tokenizer = read_tokenizer(d)
    model = load_inference_model(d, torch.float32, inference_device())
    stats = routing_stats(model, tokenizer, [row_text(r, tokenizer) for r in rows], max_tokens)
    names = None
    if (d / "moe_info.json").is_file():
        names = json.loads((d / "moe_info.json").read_text()).get("experts")
    stats.update({"model": str(d), "data": str(data), "expert_names": names})
    with write_error(out_dir), atomic_out_dir(out_dir, overwrite) as tmp:
        (tmp / "routing.json").write_text(json.dumps(stats, indent=2))
        plot_heatmap(stats, tmp / "routing.png", names)
    out = Path(out_dir)
    return {"json": out / "routing.json", "png": out / "routing.png", "stats": stats}
