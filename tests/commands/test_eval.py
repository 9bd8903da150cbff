"""`finetune eval`: the command's own refusals (the scoring itself is tests/eval/test_run.py)."""

import pytest

from finetune.commands.eval import Args, run
from finetune.typed import build
from finetune.errors import UsageError


def test_no_suite_lists_the_suites(tmp_path):
    with pytest.raises(UsageError, match=r"no suite given: finetune eval suite=NAME .*suites: .*tiny"):
        run(Args(out_dir=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_batch_size_is_refused_where_it_is_parsed():
    with pytest.raises(UsageError, match="batch_size must be >= 1, got 0"):
        build(Args, {"suite": "tiny", "batch_size": "0"})
