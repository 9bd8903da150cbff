"""Evaluation: suites of held-out tasks scored on base, adapter, merged and MoE checkpoints.

`finetune eval ...` calls `evaluate`; training calls `run_suite_after_training`.
"""

from finetune.eval.run import evaluate, run_suite_after_training

__all__ = ["evaluate", "run_suite_after_training"]
