"""Preference objectives through the training loop on hand-made pairs: the loss goes down, the
step metrics reach the loggers, accumulation is exact in pairs, and resume reproduces the
uninterrupted run. (The shipped sample through `finetune train`: tests/training/objectives/test_recipes.py.)"""

import csv
import shutil

import pytest
import torch
from safetensors.torch import load_file

from finetune.config import load_config
from finetune.data.pipeline import DataBundle, DataStats
from finetune.errors import UsageError
from finetune.training.changes import schedule_changes
from finetune.training.loop import main, make_fabric
from finetune.training.objectives.preference import PreferenceObjective, PreferenceUnits
from pref_units import feedback, pairs


@pytest.fixture
def hand_made(monkeypatch):
    def prepare(self, tokenizer, progress=True):
        units = pairs(16, seed=1) if self.paired else feedback(16, seed=1)
        return DataBundle(PreferenceUnits(units[:14]), PreferenceUnits(units[14:]), DataStats(examples=14))

    monkeypatch.setattr(PreferenceObjective, "prepare", prepare)


def run(out_dir, objective="dpo", **overrides):
    cfg = load_config("tiny-lora", {"out_dir": str(out_dir), "output.progress": "false", "train.objective": objective,
                                    "train.max_steps": "6", "train.lr": "0.01", "train.warmup_steps": "0",
                                    **{k: str(v) for k, v in overrides.items()}})
    return main(make_fabric(cfg), cfg)


def adapter(d):
    return load_file(d / "adapter_model.safetensors")


@pytest.mark.parametrize("objective", ["dpo", *(pytest.param(o, marks=pytest.mark.slow) for o in ("orpo", "simpo", "kto"))])
def test_trains_and_logs_its_metrics(hand_made, tmp_path, objective):
    r = run(tmp_path / "run", objective, **{"train.max_steps": 8})
    losses = [l for _, l in r.state.losses]
    assert losses[-1] < losses[0]
    rows = list(csv.DictReader(open(tmp_path / "run" / "logs" / "metrics.csv")))
    cols = set().union(*rows)
    assert {"train_loss", "rewards_chosen", "rewards_rejected", "logps_chosen", "logps_rejected", "val_loss"} <= cols
    if objective != "kto":
        assert {"reward_accuracy", "reward_margin"} <= cols


@pytest.mark.slow
def test_accumulation_is_exact_in_pairs(hand_made, tmp_path):
    common = {"train.max_steps": 2, "train.global_batch_size": 4, "data.packing": "false"}
    a = run(tmp_path / "a", **common, **{"train.micro_batch_size": 1})
    b = run(tmp_path / "b", **common, **{"train.micro_batch_size": 4})
    assert [l for _, l in a.state.losses] == pytest.approx([l for _, l in b.state.losses], rel=1e-5)
    wa, wb = adapter(a.final_dir), adapter(b.final_dir)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_resume_reproduces_the_uninterrupted_run(hand_made, tmp_path):
    full = run(tmp_path / "full", **{"train.save_every": 2})
    part = tmp_path / "part"
    part.mkdir()
    for step in (2, 4):
        shutil.copytree(tmp_path / "full" / f"step-{step:06d}", part / f"step-{step:06d}")
    resumed = run(part, **{"train.save_every": 2, "resume": "auto"})
    assert [l for _, l in resumed.state.losses] == [l for _, l in full.state.losses]
    wf, wr = adapter(full.final_dir), adapter(resumed.final_dir)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    for key, value in (("pref.beta", "0.2"), ("train.objective", "orpo")):  # what the adapter is trained for
        cfg = load_config("tiny-lora", {"train.objective": "dpo", key: value})
        with pytest.raises(UsageError, match=key.replace(".", r"\.")):
            schedule_changes(part / "step-000004", cfg)


@pytest.mark.parametrize("objective,first", [("dpo", 0.6931472), ("kto", 0.5)])
def test_continuing_from_an_sft_adapter_keeps_it_as_the_frozen_reference(hand_made, tmp_path, objective, first):
    sft = load_config("tiny-lora", {"out_dir": str(tmp_path / "sft"), "output.progress": "false",
                                    "train.max_steps": "3", "train.lr": "0.01"})
    start = main(make_fabric(sft), sft).final_dir
    r = run(tmp_path / objective, objective, **{"model.adapter": str(start), "train.max_steps": 2})
    # the policy starts as the SFT adapter, which is the reference: every log-ratio 0 at the first
    # step (dpo: ln 2; kto: 1 - sigmoid(0) = 0.5)
    assert r.state.losses[0][1] == pytest.approx(first, abs=1e-6)
    assert "reference" in r.model.peft_config
    assert not any(p.requires_grad for n, p in r.model.named_parameters() if ".reference." in n)
    assert not (r.final_dir / "reference").exists()  # only the trained adapter is saved
    trained, began = adapter(r.final_dir), adapter(start)
    assert set(trained) == set(began) and any(not torch.equal(trained[k], began[k]) for k in began)


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp32", marks=pytest.mark.slow)])
def test_default_precision_trains_from_ln2(hand_made, tmp_path, monkeypatch, precision):
    # precision=auto: what this CPU's probe picks, forced both ways
    monkeypatch.setenv("FINETUNE_CPU_PRECISION", precision)
    r = run(tmp_path / "run", **{"train.max_steps": 3})
    frozen = {p.dtype for n, p in r.model.named_parameters() if not p.requires_grad and p.dim() == 2}
    assert frozen == {torch.bfloat16 if precision == "bf16" else torch.float32}
    assert r.state.losses[0][1] == pytest.approx(0.6931472, abs=1e-6)
    assert all(0 < l < 1 for _, l in r.state.losses)


def test_precomputed_reference_equals_the_reference_forward(hand_made, tmp_path, monkeypatch):
    live = run(tmp_path / "live", **{"train.max_steps": 3})
    from finetune.training.objectives import preference

    calls = []
    real = preference.PairLossModule.reference_logps
    monkeypatch.setattr(preference.PairLossModule, "reference_logps",
                        lambda self, *a: calls.append(a[0].shape) or real(self, *a))
    pre = run(tmp_path / "pre", **{"train.max_steps": 3, "pref.precompute_reference": "true"})
    assert len(calls) == -(-14 // 8) + 1  # the one pass over 14 train + 2 val pairs, none in training
    assert [l for _, l in pre.state.losses] == pytest.approx([l for _, l in live.state.losses], abs=1e-5)
