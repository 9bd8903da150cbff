"""Preference-training settings that contradict each other (docs/bad-input.md, rows PT*): one line,
exit 2, before data or model are loaded and nothing written. A preference objective on supervised
data, or a preference format with sft, is refused by the data room (rows P13-P16)."""

from __future__ import annotations

import pytest

from test_bad_input import expect_error, train_args, work  # noqa: F401 (fixtures)

CASES = [
    (["train.objective=orpo", "pref.loss_type=ipo"],
     "pref.loss_type=ipo is a DPO variant; train.objective=orpo has one loss of its own"),
    (["train.objective=dpo", "pref.loss_type=hinge", "pref.label_smoothing=0.1"],
     "pref.label_smoothing=0.1 does nothing with pref.loss_type=hinge"),
    (["train.objective=kto", "pref.label_smoothing=0.1"], "pref.label_smoothing=0.1 does nothing with train.objective=kto"),
    (["train.objective=kto", "train.micro_batch_size=1"],
     "train.objective=kto estimates its KL term from the other examples of a micro-batch"),
]


@pytest.mark.parametrize("extra,needle", CASES, ids=["PT1", "PT2", "PT3", "PT4"])
def test_contradicting_preference_settings(work, capsys, extra, needle):
    expect_error(train_args(work, "recipe=tiny-dpo", *extra), 2, needle, capsys=capsys, root=work)


def test_start_adapter_missing_or_of_another_shape(work, capsys, tmp_path):
    expect_error(train_args(work, "recipe=tiny-dpo", f"model.adapter={work / 'nope'}"), 2,
                 "model.adapter: adapter directory not found", capsys=capsys, root=work)
    from tiny_peft import random_lora_adapter
    from finetune.models.tiny import tiny_model_dir

    ad = random_lora_adapter(tmp_path / "ad", tiny_model_dir(), r=4, alpha=8)
    expect_error(train_args(work, "recipe=tiny-dpo", f"model.adapter={ad}"), 2,
                 "has r=4 but lora.r=8: training continues the adapter as it is; set lora.r=4", capsys=capsys, root=work)


def test_precompute_reference_is_for_dpo(work, capsys):
    expect_error(train_args(work, "recipe=tiny-dpo", "train.objective=kto", "pref.precompute_reference=true"), 2,
                 "pref.precompute_reference=true is for train.objective=dpo; kto estimates its KL term", capsys=capsys,
                 root=work)
