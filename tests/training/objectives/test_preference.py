"""The shared part of the preference objectives on hand-made units (the data contract): a pair's
chosen and rejected in one forward, packed where it saves rows with the same per-pair sums, blank
units worth nothing, pairs as the normaliser, the reference policy (adapter disabled, or a frozen
"reference" adapter) and the metrics a step logs."""

import math

import pytest
import torch

from finetune.training.objectives import objective_for
from finetune.training.objectives.dpo import DPO
from finetune.training.objectives.kto import KTO
from finetune.training.objectives.preference import (PreferenceUnits, paired_collate, reference_policy,
                                                     unpaired_collate)
from pref_units import feedback, pairs
from tiny_peft import make_cfg, make_model


def dpo(**over):
    return DPO(make_cfg(**{"train.objective": "dpo", **over}))


def test_objective_for_reads_train_objective():
    for name in ("sft", "dpo", "orpo", "simpo", "kto"):
        assert objective_for(make_cfg(**{"train.objective": name})).name == name
    assert "pref." in DPO.defining and "train.objective" in DPO.defining


def test_a_pair_is_two_sequences_of_one_forward():
    u = pairs()
    b = paired_collate(u, pad_id=0, pack=False)
    assert b["input_ids"].shape[0] == 8 and b["weight"].tolist() == [1.0] * 4
    for i, p in enumerate(u):
        assert b["input_ids"][b["seq_index"] == i].tolist() == p["chosen_ids"]
        assert b["input_ids"][b["seq_index"] == 4 + i].tolist() == p["rejected_ids"]
    packed = paired_collate(u, pad_id=0, pack=True)
    assert packed["input_ids"].shape[0] < 8  # short sequences share rows


def test_unpaired_adds_the_mismatched_sequences():
    u = feedback()
    b = unpaired_collate(u, pad_id=0, pack=False)
    assert b["label"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert b["input_ids"][b["seq_index"] == 4].tolist() == u[3]["completion_ids"]  # prompt 0 + completion 3
    assert b["input_ids"][b["seq_index"] == 5].tolist() == u[0]["completion_ids"]
    assert int(b["seq_index"].max()) == 7
    one = unpaired_collate(u[:1], pad_id=0, pack=False)
    assert int(one["seq_index"].max()) == 0  # nothing to mismatch with


@pytest.mark.parametrize("chunk", ["0", "5"])
def test_packed_equals_unpacked(chunk):
    model = make_model()
    u = pairs()
    outs = []
    for packing in ("true", "false"):
        obj = dpo(**{"data.packing": packing, "train.loss_chunk_size": chunk})
        batch = obj.collate(u, pad_id=0)
        with torch.no_grad():
            outs.append(obj.loss_module(model)(*obj.inputs(batch)))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0][2], outs[1][2], atol=1e-5, rtol=1e-5)
    assert int(outs[0][1]) == 4


def test_pairs_normalise_and_a_blank_is_worth_nothing():
    obj = dpo()
    u = pairs()
    assert obj.trained_tokens(obj.collate(u, 0)) == 4
    blank = obj.collate([obj.blank(u[0])], 0)
    assert obj.trained_tokens(blank) == 0
    with torch.no_grad():
        loss, n, metrics = obj.loss_module(make_model())(*obj.inputs(blank))
    assert float(loss) == 0 and int(n) == 0 and not metrics.any()


def test_units_carry_lengths_for_grouping():
    u = PreferenceUnits(pairs())
    assert u.lengths() == [len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in u]
    assert u == pairs()


def test_reference_is_the_adapter_disabled_and_then_the_adapter_again():
    model = make_model()  # non-zero LoRA B: the adapter changes the outputs
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        with reference_policy(model):
            ref = model(input_ids=x).logits
        with model.disable_adapter():
            base = model(input_ids=x).logits
        again = model(input_ids=x).logits
    assert torch.equal(ref, base) and torch.equal(again, adapted) and not torch.equal(ref, adapted)


def test_a_reference_adapter_is_used_frozen(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "sft")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model.load_adapter(str(tmp_path / "sft"), adapter_name="reference", is_trainable=False)
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        with reference_policy(model):
            ref = model(input_ids=x).logits
            assert not any(p.requires_grad for p in model.parameters())
        with model.disable_adapter():
            base = model(input_ids=x).logits
    assert not torch.equal(ref, adapted) and not torch.equal(ref, base)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_step_metrics_are_sums_the_loop_divides_by_pairs():
    obj = dpo()
    model = make_model()
    batch = obj.collate(pairs(), 0)
    out = obj.loss_module(model)(*obj.inputs(batch))
    m = obj.step_metrics([tuple(x.detach() for x in out)] * 2)
    assert list(m) == ["rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin",
                       "logps_chosen", "logps_rejected"]
    assert 0 <= float(m["reward_accuracy"]) <= 8
    torch.testing.assert_close(m["reward_margin"], m["rewards_chosen"] - m["rewards_rejected"])
    assert float(m["logps_chosen"]) < 0


def test_kto_metrics_are_sum_count_pairs():
    obj = KTO(make_cfg(**{"train.objective": "kto"}))
    out = obj.loss_module(make_model())(*obj.inputs(obj.collate(feedback(), 0)))
    m = obj.step_metrics([tuple(x.detach() for x in out)])
    assert m["rewards_chosen"].shape == (2,) and float(m["rewards_chosen"][1]) == 2
    assert float(m["kl"][1]) == 1 and float(m["kl"][0]) >= 0
    assert int(out[1]) == 4 and math.isfinite(float(out[0].detach()))


def test_synthetic_batch_is_full_length_pairs():
    obj = dpo()
    b = obj.synthetic_batch(100, 2, 10)
    assert b["input_ids"].shape == (4, 10) and obj.trained_tokens(b) == 2
    assert int((b["seq_index"] >= 0).sum()) == 2 * 5 + 2 * 4
    k = KTO(make_cfg(**{"train.objective": "kto"})).synthetic_batch(100, 2, 10)
    assert k["input_ids"].shape == (4, 10)
