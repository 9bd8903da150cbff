"""What the CPU at hand reaches in matmuls, and how a training step splits into matmuls and the rest.

`matmul_ceiling` times torch.mm at the benchmark's own shapes (tokens x hidden by hidden x out of
the model's projections, and a slice of the head), fresh, in fp32 and bf16: the best GFLOP/s over
the shapes is that dtype's ceiling, measured in the same machine state as the run it is compared
with. `StepProfiler` runs torch.profiler over a few training steps and sums the self time of the
matmul ops (forward and backward: mm, addmm, bmm, linear, matmul, scaled-dot-product attention and
their backward kernels) against the steps' wall time, listing the biggest other ops.
"""

from __future__ import annotations

import re
import time

MATMUL_OPS = re.compile(r"^aten::(mm|addmm|bmm|baddbmm|addbmm|linear|matmul|_scaled_dot_product\w*|"
                        r"scaled_dot_product\w*|_flash_attention\w*|_efficient_attention\w*)$")


def matmul_shapes(tokens: int, linears: dict, hidden: int, vocab: int) -> list[tuple[int, int, int]]:
    """(n, k, m) of the step's distinct projection matmuls plus a 1/16 slice of the head."""
    shapes = {(tokens, i, o) for i, o in linears.values()}
    shapes.add((tokens, hidden, max(vocab // 16, 1)))
    return sorted(shapes)


def _time_mm(n: int, k: int, m: int, dtype, min_s: float) -> float:
    import torch

    a, b = torch.randn(n, k).to(dtype), torch.randn(k, m).to(dtype)
    torch.mm(a, b)  # first call: allocation and kernel choice
    best, spent, reps = float("inf"), 0.0, 0
    while spent < min_s or reps < 3:
        t0 = time.perf_counter()
        torch.mm(a, b)
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return 2 * n * k * m / best / 1e9


def matmul_ceiling(shapes, min_s: float = 0.3) -> dict:
    """{fp32|bf16: {gflops: best over shapes, by_shape: {"n x k x m": GFLOP/s}}}, best of reps each."""
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        by = {f"{n}x{k}x{m}": round(_time_mm(n, k, m, dtype, min_s), 1) for n, k, m in shapes}
        out[name] = {"gflops": max(by.values()), "by_shape": by}
    out["threads"] = torch.get_num_threads()
    return out


class StepProfiler:
    """Profile the steps between start() and stop() (call both at optimizer-step ends)."""

    def __init__(self):
        self.prof = None
        self.t0 = None
        self.summary = None

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.prof = profile(activities=[ProfilerActivity.CPU])
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def stop(self, steps: int) -> dict:
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        self.summary = split(self.prof.key_averages(), wall, steps)
        self.prof = None
        return self.summary


def split(averages, wall_s: float, steps: int, top: int = 8) -> dict:
    """Matmul self time vs the rest of the profiled wall time (see the module doc)."""
    mm, others = 0.0, []
    for e in averages:
        s = e.self_cpu_time_total / 1e6
        if MATMUL_OPS.match(e.key):
            mm += s
        elif s > 0:
            others.append((s, e.key))
    others.sort(reverse=True)
    return {"profiled_steps": steps, "profiled_s": round(wall_s, 3), "matmul_s": round(mm, 3),
            "matmul_fraction": round(mm / wall_s, 3) if wall_s else None,
            "top_other_ops_s": {k: round(s, 3) for s, k in others[:top]}}
