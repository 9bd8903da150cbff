"""Each loss against TRL's own implementation on the same tiny batch, within 1e-5 (slow; skipped
where TRL is not installed: it is the `bench` extra).

DPO and KTO run TRL's trainers on the tiny model (peft adapter with non-zero B, so the loss is not
ln 2): TRL tokenizes and collates, and our objective takes the same token ids from TRL's batch.
Both sides use the same PeftModel and the same reference. Given a PeftModel, TRL copies its adapter
into a frozen "ref" adapter (its reference for re-training an existing adapter), which would make
policy == reference on TRL's side only; the base-reference tests delete that copy, so TRL, like us
without model.adapter, takes the base with the adapter disabled. The adapter-reference test keeps
TRL's copy, moves the policy's adapter away from it, and gives ours the same copy as its frozen
"reference" adapter (what model.adapter=PATH builds). Each test first checks that the loss is not
the policy == reference value, so a reference mix-up cannot pass.
ORPO's odds-ratio term and SimPO's loss are TRL's loss functions on the same log-probs (ORPO's
supervised term differs on purpose: TRL's counts the prompt tokens too, the paper's and ours only
the chosen answer's)."""

import math
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")

from finetune.models.load import load_tokenizer  # noqa: E402
from finetune.training.objectives.preference import REFERENCE_ADAPTER, Logps  # noqa: E402
from tiny_peft import make_cfg, make_model  # noqa: E402

pytestmark = pytest.mark.slow

ROWS = [{"prompt": "Say hi.", "chosen": " Hi there!", "rejected": " No."},
        {"prompt": "Two plus two?", "chosen": " Four.", "rejected": " Five, surely."},
        {"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " Lyon."},
        {"prompt": "Colour of the sky?", "chosen": " Blue.", "rejected": " Green, mostly."}]


def units_from(batch, n_pairs: int, label=None):
    """Our units from TRL's collated rows [chosen..., rejected...] (or KTO's one row per example)."""
    seqs = []
    for ids, att, comp in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]):
        ids = ids[att.bool()].tolist()
        start = int(comp[att.bool()].nonzero()[0])
        seqs.append((ids[:start], ids[start:]))
    if label is not None:
        return [{"prompt_ids": p, "completion_ids": c, "label": bool(l)} for (p, c), l in zip(seqs, label)]
    return [{"prompt_ids": seqs[i][0], "chosen_ids": seqs[i][1], "rejected_ids": seqs[n_pairs + i][1]}
            for i in range(n_pairs)]


# Each loss when policy == reference (every log-ratio 0), at beta = 0.1.
TRIVIAL = {"sigmoid": math.log(2), "robust": math.log(2), "hinge": 1.0, "ipo": (1 / (2 * 0.1)) ** 2, "kto": 0.5}


def base_reference(trainer):
    """Drop TRL's "ref" copy of the adapter: TRL then takes the base with adapters disabled."""
    if "ref" in trainer.model.peft_config:
        trainer.model.delete_adapter("ref")
    assert list(trainer.model.peft_config) == ["default"]


def adapter_reference(model, policy_b):
    """Keep TRL's frozen "ref" copy of the adapter as the reference and give ours the same copy as
    its "reference" adapter; then the policy's lora_B becomes policy_b(lora_B) (in place)."""
    assert "ref" in model.peft_config
    model.add_adapter(REFERENCE_ADAPTER, model.peft_config["default"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ref." in name:
                model.get_parameter(name.replace(".ref.", f".{REFERENCE_ADAPTER}.")).copy_(p)
            if ".default." in name and "lora_B" in name:
                policy_b(p)
    model.set_adapter("default")


def ours(objective, units, model):
    batch = objective.collate(units, pad_id=0)
    with torch.no_grad():
        loss, n = objective.loss_module(model)(*objective.inputs(batch))[:2]
    return float(loss / n)


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)])
def test_dpo_equals_trl(tmp_path, loss_type, smoothing):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from finetune.training.objectives.dpo import DPO

    model = make_model()
    model.eval()
    tok = load_tokenizer(make_cfg().model)
    args = DPOConfig(output_dir=str(tmp_path), beta=0.1, loss_type=loss_type, label_smoothing=smoothing,
                     per_device_train_batch_size=4, report_to=[], use_cpu=True, max_length=None)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tok)
    base_reference(trainer)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        theirs = float(trainer.compute_loss(model, batch))
    assert abs(theirs - TRIVIAL[loss_type]) > 1e-3, "policy == reference: the comparison would say nothing"
    cfg = make_cfg(**{"train.objective": "dpo", "pref.loss_type": loss_type, "pref.label_smoothing": smoothing})
    assert ours(DPO(cfg), units_from(batch, 4), model) == pytest.approx(theirs, abs=1e-5)


def test_dpo_adapter_reference_equals_trl(tmp_path):
    """Continuing from an adapter: the reference is that adapter, frozen (TRL's "ref", our "reference")."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from finetune.training.objectives.dpo import DPO

    model = make_model()
    model.eval()
    tok = load_tokenizer(make_cfg().model)
    args = DPOConfig(output_dir=str(tmp_path), beta=0.1, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                     max_length=None)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tok)
    gen = torch.Generator().manual_seed(2)
    # the policy moves away from where it started
    adapter_reference(model, lambda b: b.add_(torch.randn(b.shape, generator=gen) * 0.05))
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        theirs = float(trainer.compute_loss(model, batch))
    assert abs(theirs - TRIVIAL["sigmoid"]) > 1e-3, "policy == reference: the comparison would say nothing"
    assert ours(DPO(make_cfg(**{"train.objective": "dpo"})), units_from(batch, 4), model) == pytest.approx(theirs, abs=1e-5)


@pytest.mark.parametrize("reference,desirable,undesirable", [("base", 1.0, 1.0), ("adapter", 1.5, 0.7)])
def test_kto_equals_trl(tmp_path, reference, desirable, undesirable):
    """With the base as reference the batch's KL estimate is negative, so clamped to 0; swapping the
    roles (reference = the adapter, policy = the base: its lora_B zeroed) makes it positive, so the
    KL term takes part."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from finetune.training.objectives.kto import KTO

    model = make_model()
    model.eval()
    tok = load_tokenizer(make_cfg().model)
    rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
            for r in ROWS for side in ("chosen", "rejected")]
    args = KTOConfig(output_dir=str(tmp_path), beta=0.1, per_device_train_batch_size=8, report_to=[], use_cpu=True,
                     desirable_weight=desirable, undesirable_weight=undesirable)
    trainer = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    if reference == "base":
        base_reference(trainer)
    else:
        adapter_reference(model, lambda b: b.zero_())
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        theirs = float(trainer.compute_loss(model, batch))
    assert abs(theirs - TRIVIAL["kto"]) > 1e-3, "policy == reference: the comparison would say nothing"
    kl = trainer._metrics["eval"]["kl"][-1]
    assert kl == 0 if reference == "base" else kl > 0
    units = units_from(batch, 8, label=batch["label"])
    cfg = make_cfg(**{"train.objective": "kto", "pref.desirable_weight": desirable,
                      "pref.undesirable_weight": undesirable})
    assert ours(KTO(cfg), units, model) == pytest.approx(theirs, abs=1e-5)


def logps():
    g = torch.Generator().manual_seed(0)
    n = torch.randint(2, 9, (2, 6), generator=g).float()
    s = -torch.rand(2, 6, generator=g) * n * 2
    return Logps(s[0], s[1], n[0], n[1])


def test_orpo_odds_ratio_equals_trl():
    from trl.experimental.orpo import ORPOTrainer

    from finetune.training.objectives.orpo import orpo_loss

    lp = logps()
    a = lp.mean()
    stub = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    trl_or, *_ = ORPOTrainer.odds_ratio_loss(stub, a.chosen, a.rejected)
    # ours: -a_w - lambda log sigmoid(...); TRL's term: lambda log sigmoid(...) (subtracted from its NLL)
    torch.testing.assert_close(orpo_loss(lp, 0.25).losses, -a.chosen - trl_or, atol=1e-5, rtol=0)


def test_simpo_equals_trl_cpo_simpo():
    from trl.experimental.cpo import CPOTrainer

    from finetune.training.objectives.simpo import simpo_loss

    lp = logps()
    a = lp.mean()
    stub = SimpleNamespace(beta=2.0, simpo_gamma=0.5, label_smoothing=0.1, loss_type="simpo", alpha=0.0,
                           accelerator=SimpleNamespace(device="cpu"))
    theirs, *_ = CPOTrainer.cpo_loss(stub, a.chosen, a.rejected)
    torch.testing.assert_close(simpo_loss(lp, 2.0, 0.5, 0.1).losses, theirs, atol=1e-5, rtol=0)
