"""Running bench/gpu_qlora.py's workers: fresh processes within one overall deadline, whole logs,
results saved after every worker; the device's facts read without creating a CUDA context."""

from __future__ import annotations

import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GiB = 1024 ** 3
BUDGET = 12 * GiB  # the card the product is for
# What a run may use of a "12 GB" card, CUDA context included: such cards report about 11.7 GiB
# to torch, and the context sits outside torch's cap. The cap of every worker is this minus its
# own measured context; "fits" is peak reserved + context within it.
LIMIT = int(11.5 * GiB)
# --cpu-smoke (inherited by the workers): tiny shape on the CPU, every code path, no GPU calls.
SMOKE_ENV = "GPU_QLORA_CPU_SMOKE"
SMOKE = os.environ.get(SMOKE_ENV) == "1"


class Runner:
    """Runs workers in fresh processes within one overall deadline; keeps each one's whole output
    in logs/<name>.log; saves the results file after every worker and part."""

    def __init__(self, script: Path, out_path: Path, logs: Path, budget_s: float, per_worker_s: float, out: dict):
        self.script, self.out_path, self.logs, self.out = script, out_path, logs, out
        self.deadline, self.per_worker_s = time.time() + budget_s, per_worker_s
        logs.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out_path.with_name(self.out_path.name + ".tmp")
        tmp.write_text(json.dumps(self.out, indent=1, default=str) + "\n")
        os.replace(tmp, self.out_path)

    def command(self, name: str, cmd: list, timeout: float, env=None) -> tuple:
        """(returncode or 'timeout', wall seconds, whole output); output also in logs/<name>.log."""
        log_path = self.logs / f"{name}.log"
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            log.write(f"$ {' '.join(map(str, cmd))}  (timeout {timeout:.0f}s)\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=max(timeout, 1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = "timeout"
        return rc, round(time.perf_counter() - t0, 1), log_path.read_text(errors="replace")

    def worker(self, name: str, kind: str, spec: dict, min_s: float = 30) -> dict:
        """One measurement; OOM, timeout or any failure comes back as ok=False with its error line."""
        if self.left() < min_s:
            return {"ok": False, "skipped": f"overall budget: {self.left():.0f}s left"}
        spec = {**spec, "others_used_bytes": gpu_used_bytes()}
        fd, spec_path = tempfile.mkstemp(suffix=".json", prefix=f"gpu-qlora-{name}-")
        os.close(fd)
        Path(spec_path).write_text(json.dumps(spec))
        timeout = min(self.per_worker_s, self.left())
        rc, wall, text = self.command(name, [sys.executable, str(self.script), "--worker", kind, "--spec", spec_path], timeout)
        result = Path(spec_path + ".result")
        if rc == 0 and result.is_file():
            res = {"ok": True, **json.loads(result.read_text()), "wall_s": wall}
        else:
            lines = [ln for ln in text.strip().splitlines() if ln.strip()]
            err = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "?")
            res = {"ok": False, "rc": rc, "wall_s": wall, "error": err[:400],
                   "oom": "OutOfMemoryError" in text or "out of memory" in text.lower()}
        res["log"] = str(self.logs / f"{name}.log")
        for path in (Path(spec_path), result):
            path.unlink(missing_ok=True)
        return res


def gpu_used_bytes():
    """Device memory in use now, from nvidia-smi (the parent never creates a CUDA context)."""
    if SMOKE:
        return 0
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                              capture_output=True, text=True, timeout=30).stdout
        return int(float(text.strip().splitlines()[0]) * 2**20)
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def fits(res: dict) -> dict:
    """Whether a run fits a 12 GB card: the training peak reserved + the process's memory outside
    torch (the CUDA context as measured, or more at the end) within LIMIT (11.5 GiB), with the
    named fields every part reports: limit_GiB, context_GiB, load_peak_reserved_GiB (loading,
    before the cache was emptied) and train_peak_reserved_GiB (the steps)."""
    if not res.get("ok") or "peak_reserved_bytes" not in res:
        return {}
    outside = max(res.get("context_bytes") or 0, res.get("end_non_torch_bytes") or 0)
    total = res["peak_reserved_bytes"] + outside
    load = res.get("load_peak_reserved_bytes")
    return {"reserved_plus_context_bytes": total, "fits_12GiB_card": total <= LIMIT,
            "limit_GiB": round(LIMIT / GiB, 3), "context_GiB": round(outside / GiB, 3),
            "load_peak_reserved_GiB": None if load is None else round(load / GiB, 3),
            "train_peak_reserved_GiB": round(res["peak_reserved_bytes"] / GiB, 3),
            "load_fits": None if load is None else load + outside <= LIMIT}


def hardware() -> dict:
    """GPU, driver, CUDA and flash-attn versions without creating a CUDA context here."""
    import torch

    out = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch_cuda": torch.version.cuda,
           "cap_bytes": BUDGET}
    if SMOKE:
        return {**out, "gpu": None, "smoke": "cpu"}
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader",
                               "-i", "0"], capture_output=True, text=True, timeout=30).stdout.strip()
        name, mem, driver = [x.strip() for x in text.split(",")]
        out.update(gpu=name, gpu_memory=mem, driver=driver)
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        out["nvidia_smi_error"] = str(e)[:200]
    return out


def synthetic_data(path: Path, rows: int = 400, lo: int = 300, hi: int = 1800, seed: int = 0) -> Path:
    """Text rows of lo-hi bytes (= byte tokens). Short rows: packing fills 2048-token sequences;
    rows longer than the seq len: every sequence is one example, truncated (one causal block)."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "memory", "adapter", "quantized", "token", "layer", "the"]
    with path.open("w") as f:
        for _ in range(rows):
            n = rng.randint(lo, hi)
            text = " ".join(rng.choice(words) for _ in range(n // 5))[:n]
            f.write(json.dumps({"text": text}) + "\n")
    return path
