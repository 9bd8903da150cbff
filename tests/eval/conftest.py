"""Eval fixtures: LoRA adapters on the tiny model (built by tests/tiny_peft.py)."""

import pytest
from tiny_peft import random_lora_adapter

# q/v (attention) and down_proj (MLP): an adapter shaped like a real fine-tune's, small and quick.
EVAL_TARGETS = ["q_proj", "v_proj", "down_proj"]


def eval_adapter(base_dir, out_dir, seed=1):
    """A LoRA adapter for `base_dir` that changes the outputs enough to move every score."""
    return random_lora_adapter(out_dir, base_dir, seed=seed, scale=0.2, target_modules=EVAL_TARGETS)


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model, tmp_path_factory):
    return eval_adapter(tiny_model, tmp_path_factory.mktemp("run") / "final")


@pytest.fixture
def adapter_factory():
    """eval_adapter(base_dir, out_dir, seed=1), for tests that need adapters on other bases."""
    return eval_adapter
