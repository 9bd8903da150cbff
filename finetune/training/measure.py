"""`finetune plan ... measure=true`: run real training steps and measure the memory the planner predicts.

The planner (finetune.plan.predict) is arithmetic; this is the check. It builds the recipe's model, loss and
optimizer with training's own `finetune.training.build.build_step` (memory features, chunked loss,
MoE router term and optimizer included), runs one step so the optimizer state exists, then measures the
next step: the bytes torch's allocator holds at its peak, with the model and optimizer set up by Fabric under
the precision plugin training uses (autocast on a GPU at bf16-mixed). That is the planner's "allocated" sum
(every part but the CUDA context and the allocator slack), so the two compare directly. It lives in
training, not in the planner, so the planner stays torch-free and below training.

- GPU: `torch.cuda.max_memory_allocated` (and reserved, which adds the allocator's fragmentation).
- CPU: torch has no allocator statistics there, but its profiler records every CPU allocation and
  free with the running total (`profile_memory=True`). It only counts what is allocated while it
  runs, so the step's peak is what was live before it (parameters, buffers, quantization state,
  optimizer state, the batch: counted tensor by tensor) plus the largest running total during it.

The batch is the objective's synthetic one (finetune.training.objectives; SFT: random token ids,
every position trained, and with `data.packing` two examples per row, position ids restarting
halfway, so attention gets the block-diagonal mask real packing gives).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

from finetune.config import Config
from finetune.models.load import load_tokenizer
from finetune.errors import UsageError
from finetune.plan.predict import CUDA_CONTEXT_BYTES
from finetune.plan.shapes import model_shape
from finetune.runtime import default_device, planned_precision, resolve_precision
from finetune.training.build import build_step
from finetune.training.objectives import objective_for


def _storages_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and tied weights count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _live_tensors(model, optimizer, batch: dict):
    yield from model.parameters()
    yield from model.buffers()
    for m in model.modules():
        yield from _quant_state_tensors(m)
    for state in optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))
    yield from batch.values()


def _quant_state_tensors(module) -> list:
    """bitsandbytes keeps a 4-bit weight's absmax/code (and the nested double-quant state) outside
    the parameters."""
    qs = getattr(getattr(module, "weight", None), "quant_state", None)
    if qs is None:
        return []
    out = [v for v in vars(qs).values() if isinstance(v, torch.Tensor)]
    nested = getattr(qs, "state2", None)
    if nested is not None:
        out += [v for v in vars(nested).values() if isinstance(v, torch.Tensor)]
    return out


def static_bytes(model, optimizer=None) -> dict[str, dict[str, int]]:
    """What lives through the whole run, by the planner's part names and dtype: {part: {dtype: bytes}}.

    quantized_weights (or base_weights without quantization): the frozen block linears, with
    bitsandbytes' quantization constants; unquantized_weights: every other frozen parameter
    (embeddings, head, norms); lora_params: the trained parameters; optimizer_state. Distinct
    storages count once (tied embeddings, views)."""
    head = model.get_output_embeddings()
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    quantized = any(hasattr(getattr(m, "weight", None), "quant_state") for m in model.modules())
    linear_part = "quantized_weights" if quantized else "base_weights"
    seen: set[int] = set()
    out: dict[str, dict[str, int]] = {}

    def add(part: str, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            return
        seen.add(storage.data_ptr())
        key = str(t.dtype).replace("torch.", "")
        out.setdefault(part, {})
        out[part][key] = out[part].get(key, 0) + storage.nbytes()

    for m in model.modules():
        is_linear = isinstance(m, torch.nn.Linear) or hasattr(getattr(m, "weight", None), "quant_state")
        for p in m.parameters(recurse=False):
            if p.requires_grad:
                add("lora_params", p)
            elif is_linear and id(p) not in head_params:
                add(linear_part, p)
            else:
                add("unquantized_weights", p)
        for t in _quant_state_tensors(m):
            add(linear_part, t)
    for state in (optimizer.state.values() if optimizer is not None else ()):
        for v in state.values():
            if isinstance(v, torch.Tensor):
                add("optimizer_state", v)
    return out


@contextlib.contextmanager
def _quiet_fd2():
    """Silence file descriptor 2: the profiler's C++ side prints start/stop lines there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_step_peak(step) -> int:
    """Peak bytes allocated by torch on the CPU while `step()` runs, above what was live before."""
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_fd2():
        prof.__enter__()
    try:
        step()
    finally:
        with _quiet_fd2():
            prof.__exit__(None, None, None)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    return max(totals, default=0)


def measure(cfg: Config, micro_batch: Optional[int] = None, seq_len: Optional[int] = None,
            device: Optional[torch.device] = None) -> dict:
    """Peak bytes of one training step of `cfg` (the second: optimizer state exists by then)."""
    device = device or default_device(cfg.accelerator)
    context = None
    if device.type == "cuda":  # the CUDA context (+ whatever else holds this GPU) before any tensor
        torch.cuda.init()
        torch.zeros(1, device=device)
        free, total = torch.cuda.mem_get_info(device)
        context = total - free - torch.cuda.memory_reserved(device)
    micro = micro_batch or (cfg.train.micro_batch_size if isinstance(cfg.train.micro_batch_size, int) else 1)
    seq = seq_len or cfg.data.seq_len
    torch.manual_seed(cfg.train.seed)
    objective = objective_for(cfg)
    built = build_step(cfg, device, load_tokenizer(cfg.model))
    model, optimizer = built.model, built.optimizer
    fabric = precision_fabric(cfg, device)
    # Wrapped as training wraps them: Fabric's precision plugin converts the module, runs forward
    # under its context (autocast for *-mixed, which changes peft's LoRA path and what autograd
    # keeps) and scales the backward where it uses a scaler.
    lossmod, fabric_optimizer = fabric.setup(built.lossmod, optimizer)
    vocab = model.get_output_embeddings().weight.shape[0]
    batch = objective.synthetic_batch(vocab, micro, seq)
    tokens = objective.trained_tokens(batch)
    batch = {k: v.to(device) for k, v in batch.items()}

    def step() -> float:
        loss, n = lossmod(*objective.inputs(batch))[:2]
        fabric.backward(loss / n)
        fabric_optimizer.step()
        fabric_optimizer.zero_grad(set_to_none=True)
        return float(loss.detach() / n)

    step()  # creates the optimizer state
    static = static_bytes(model, optimizer)
    out = {"device": str(device), "micro_batch": micro, "seq_len": seq,
           "static_bytes": static, "static_bytes_total": sum(sum(d.values()) for d in static.values())}
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        out["context_bytes"] = context
    else:
        before = _storages_bytes(_live_tensors(model, optimizer, batch))
        out["live_before_step_bytes"] = before
        out["peak_allocated_bytes"] = before + _cpu_step_peak(step)
    out["step_seconds"] = round(time.perf_counter() - t0, 3)
    out["trained_tokens"] = tokens
    return out


def precision_fabric(cfg: Config, device: torch.device):
    """A one-device Fabric with the precision plugin training gets for `cfg` (finetune.runtime.
    resolve_precision), so the measured step runs as a training step does."""
    import lightning as L

    _, precision = resolve_precision(dataclasses.replace(cfg, accelerator=device.type))
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else 1
    return L.Fabric(accelerator=device.type, devices=devices, strategy="auto", precision=precision)


# --------------------------------------------------------------------------- against the prediction (`finetune plan ... measure=true`)

CPU_MEASURE_MAX_PARAMS = 2_000_000_000  # beyond this a CPU step takes too long to be a check
STATIC_PARTS = ("quantized_weights", "base_weights", "unquantized_weights", "lora_params", "optimizer_state")


def measured_device_cfg(cfg: Config) -> Config:
    """cfg with accelerator set to the device the measurement will run on, so the prediction it is
    compared with is for that device (dtype, dropout masks, CPU attention, no CUDA context)."""
    device = default_device(cfg.accelerator)
    if device.type == "cpu" and model_shape(cfg.model.name, cfg.model.revision).n_params() > CPU_MEASURE_MAX_PARAMS:
        raise UsageError(f"measure=true: {cfg.model.name} is too big to measure on this machine's CPU; "
                         "run it where a GPU is, or measure a smaller model")
    # precision=auto resolved as the runtime resolves it here (on a CPU: its probe's choice)
    return dataclasses.replace(cfg, accelerator=device.type, precision=planned_precision(cfg, device))


def add_measurement(cfg: Config, rep: dict) -> None:
    """Measure a training step of `cfg` at the report's micro-batch and seq_len; add it to `rep`
    as `measured`, with the four numbers it is for side by side."""
    rep["measured"] = _measure(cfg, rep)
    rep.update(_measured_summary(rep))


def _measured_summary(rep: dict) -> dict:
    """The four numbers `measure=true` is for, side by side (bytes)."""
    m, parts = rep["measured"], rep["parts"]
    gpu = "peak_reserved_bytes" in m
    return {
        "predicted_static_bytes": sum(parts.get(k, 0) for k in STATIC_PARTS),
        "measured_static_bytes": m["static_bytes_total"],
        "predicted_peak_bytes": rep["peak_bytes"] if gpu else m["predicted_allocated_bytes"],
        "measured_peak_bytes": m["peak_with_context_bytes"] if gpu else m["peak_allocated_bytes"],
    }


def _measure(cfg: Config, rep: dict) -> dict:
    m = measure(cfg, micro_batch=rep["micro_batch"], seq_len=rep["seq_len"])
    parts = rep["parts"]
    predicted = sum(v for k, v in parts.items() if k not in ("cuda_context", "allocator_slack"))
    m["predicted_allocated_bytes"] = predicted
    m["error"] = round(predicted / m["peak_allocated_bytes"] - 1, 4)
    if "peak_reserved_bytes" in m:  # what nvidia-smi would show, against the whole prediction
        m["peak_with_context_bytes"] = m["peak_reserved_bytes"] + m.get("context_bytes", CUDA_CONTEXT_BYTES)
        m["error_with_context_and_slack"] = round(rep["peak_bytes"] / m["peak_with_context_bytes"] - 1, 4)
    return m
