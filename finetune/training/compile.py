"""`train.compile`: regional torch.compile of the decoder layers, and what a run says about it.

Regional, because that is torch's recommendation for transformers: every decoder layer is the
same code, so each layer's `nn.Module.compile()` shares one compiled graph (dynamo caches per code
object and treats the parameters as inputs), and compile time is one layer's, not the model's.
Dynamo retraces where a guard differs: the first layer's input needs no grad (frozen embeddings)
and the others' do, so a LoRA model has two graphs; a new sequence length retraces once more and
then compiles a dynamic-shape graph. Eval mode / no_grad (validation) is another trace.

It runs after the memory features (finetune.training.build calls it last), so what is compiled
is the forward training runs: lean SwiGLU / attention, tiled MLPs, peft's LoRA layers. HF's
gradient checkpointing wraps the compiled layer (GradientCheckpointingLayer.__call__ checkpoints
the compiled call), so backward recomputes through the compiled forward. What dynamo cannot
trace (bitsandbytes' 4-bit ops on some builds, a tile loop's checkpoint) is a graph break: that
part runs eagerly and the rest still compiles. Breaks are counted from dynamo's counters and
reported, never hidden.

`CompileWatch` tells the loop which steps compiled, so their wall time is reported as compile
seconds and kept out of tokens/s.
"""

from __future__ import annotations

import time
from typing import Optional, Union

import torch
from torch import nn

from finetune.memory.tiled import decoder_layers


# torch.compile's backend. Inductor generates the kernels (C++/OpenMP on a CPU, Triton on a GPU);
# the fast tests swap in "aot_eager" (the same dynamo/AOT tracing and graph breaks, no codegen).
BACKEND = "inductor"


def compile_decoder_layers(model: nn.Module) -> int:
    """Compile every decoder layer of `model` in place (nn.Module.compile: the module stays, its
    call goes through torch.compile, so state_dict names, peft and FSDP wrapping are unchanged).
    Returns how many layers were set to compile; compilation itself happens at the first call."""
    n = 0
    for layer in decoder_layers(model):
        layer.compile(backend=BACKEND)
        n += 1
    return n


def _counters() -> tuple[int, int, dict]:
    """(compile events so far, graph breaks so far, break reason -> count) in this process.
    A compile event is any dynamo/inductor compilation, the lazily compiled backward included."""
    try:
        from torch._dynamo.utils import compilation_time_metrics, counters
    except ImportError:  # a torch without dynamo: nothing ever compiles
        return 0, 0, {}
    events = sum(len(v) for v in compilation_time_metrics.values())
    breaks = dict(counters["graph_break"])
    return events, sum(breaks.values()), breaks


class CompileWatch:
    """Which stretches of a run compiled. `compiled(now)` is called at each step's start and end:
    when anything compiled since the previous call, the time since then is compile time.
    Graph breaks are counted from when the watch was made (the process may have compiled before)."""

    def __init__(self, layers: int = 0, now: Optional[float] = None):
        self.layers = layers
        self.seconds = 0.0
        self.steps: list[int] = []  # the steps whose time counted as compile time
        self._events, self._breaks0, self._reasons0 = _counters()
        self._mark = time.perf_counter() if now is None else now

    def compiled(self, now: float, step: Optional[int] = None) -> bool:
        """Whether anything compiled since the last call; if so its time counts as compile time."""
        events = _counters()[0]
        changed = events != self._events
        if changed:
            self.seconds += now - self._mark
            if step is not None:
                self.steps.append(step)
        self._events, self._mark = events, now
        return changed

    @property
    def active(self) -> bool:
        """Whether there is anything to report (layers set to compile, or something compiled)."""
        return bool(self.layers or self.seconds)

    def graph_breaks(self) -> tuple[int, dict]:
        """(graph breaks since the watch was made, reason -> count of those)."""
        _, total, reasons = _counters()
        new = {k: v - self._reasons0.get(k, 0) for k, v in reasons.items() if v > self._reasons0.get(k, 0)}
        return total - self._breaks0, new

    def metrics(self) -> dict[str, float]:
        """Cumulative compile seconds and graph breaks, for metrics.csv ({} when nothing compiles)."""
        if not self.active:
            return {}
        return {"compile_s": round(self.seconds, 3), "graph_breaks": self.graph_breaks()[0]}

    def step_line(self, step: int) -> str:
        return f"compile: step {step} compiled; {self.seconds:.1f} s of compile steps so far (excluded from tokens/s)"

    def summary_line(self) -> Optional[str]:
        """The run's compile report: layers, compile seconds, graph breaks and their main reason."""
        if not self.active:
            return None
        n, reasons = self.graph_breaks()
        steps = ", ".join(map(str, self.steps)) or "none"
        line = (f"compile: {self.layers} decoder layers compiled; {self.seconds:.1f} s in steps that compiled "
                f"(steps {steps}, excluded from tokens/s); {n} graph break(s)")
        if reasons:
            reason, count = max(reasons.items(), key=lambda kv: kv[1])
            line += f", most often ({count}x): {' '.join(str(reason).split())[:160]}"
        return line


def compile_line(layers: int, device: Union[str, torch.device]) -> Optional[str]:
    """The line a run prints when it compiles (None when it does not)."""
    if not layers:
        return None
    kernels = "Triton" if torch.device(device).type == "cuda" else "C++/OpenMP"
    return (f"train.compile: {layers} decoder layers compile at their first call (inductor, {kernels} kernels); "
            "the first steps take longer and are reported as compile time")
