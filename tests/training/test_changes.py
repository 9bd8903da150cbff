"""What a resumed run may change, against the checkpoint's config.yaml: the objective's own defining
settings are refused like the adapter's; the schedule may change. (The CLI's side of it is in
tests/training/test_run_safety.py.)"""

import pytest

from finetune.config import load_config, to_yaml
from finetune.errors import UsageError
from finetune.training.changes import history_comments, schedule_changes


def checkpoint_of(tmp_path, **overrides):
    cfg = load_config("tiny-lora", {k: str(v) for k, v in overrides.items()})
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    return tmp_path


def test_the_objective_defining_setting_is_refused(tmp_path):
    ckpt = checkpoint_of(tmp_path)
    new = load_config("tiny-lora", {"train.router_aux_loss_coef": "0.02"})
    with pytest.raises(UsageError, match="changed settings that define the adapter: "
                                         r"train.router_aux_loss_coef 0.0 -> 0.02; resume with"):
        schedule_changes(ckpt, new)


def test_schedule_changes_are_returned_and_free_ones_ignored(tmp_path):
    ckpt = checkpoint_of(tmp_path)
    new = load_config("tiny-lora", {"train.lr": "0.5", "train.log_every": "3", "data.num_proc": "2"})
    changes = schedule_changes(ckpt, new)
    assert changes == {"train.lr": [0.003, 0.5]}
    assert history_comments([{"step": 2, "changes": changes}]) == (
        "# resumed at step 2 with changed schedule: train.lr 0.003 -> 0.5 (steps up to 2 ran with the old values)\n")


def test_a_checkpoint_without_config_has_nothing_to_compare(tmp_path):
    assert schedule_changes(tmp_path, load_config("tiny-lora", {"lora.r": "4"})) == {}
