import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tiny_peft.py, without making tests/ a package

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model():
    """The on-disk tiny random Llama (built once per cache)."""
    from finetune.models.tiny import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tiny matmuls gain nothing from threads, and on a shared
    machine two OpenMP threads waiting for each other made a step 100x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


# Keep tests off the network and deterministic.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# precision=auto on a CPU with fast bf16 would train in bf16; the tests' expected losses are fp32's.
# Tests of the auto policy itself set or unset this themselves (tests/test_runtime_precision.py).
os.environ.setdefault("FINETUNE_CPU_PRECISION", "fp32")
