"""finetune.training.report: what train.micro_batch_size=auto sizes against."""

import torch

from finetune.plan.predict import CUDA_CONTEXT_BYTES
from finetune.training import report

GiB = 1024 ** 3


def test_auto_budget_is_free_memory_not_the_card(monkeypatch):
    """Another process holds 20 of 80 GiB and this one 3 GiB (its loaded model): auto sizes against
    the 57 GiB free + 3 GiB its own (+ the context the planner counts itself), not against 80."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (57 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * GiB)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 1.0)
    cuda = torch.device("cuda", 0)
    assert report.auto_budget(cuda) == 60 * GiB + CUDA_CONTEXT_BYTES
    # a per-process cap below what is free bounds it too
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 0.5)
    assert report.auto_budget(cuda) == 40 * GiB + CUDA_CONTEXT_BYTES
    assert report.auto_budget(torch.device("cpu")) == report.CPU_BUDGET_BYTES
