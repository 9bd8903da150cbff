import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # helpers.py, without making tests/ a package

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"  # repo/../shared/data


@pytest.fixture(scope="session")
def tok():
    from finetune.models.tiny import byte_tokenizer

    return byte_tokenizer()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
