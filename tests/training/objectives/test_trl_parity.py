"""Each loss against TRL's own implementation on the same tiny batch, within 1e-5 (slow; skipped
where TRL is not installed: it is the `bench` extra).

DPO and KTO run TRL's trainers on the tiny model (peft adapter with non-zero B, so the loss is not
ln 2): TRL tokenizes and collates, and our objective takes the same token ids from TRL's batch.
ORPO's odds-ratio term and SimPO's loss are TRL's loss functions on the same log-probs (ORPO's
supervised term differs on purpose: TRL's counts the prompt tokens too, the paper's and ours only
the chosen answer's)."""

from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")

from finetune.models.load import load_tokenizer  # noqa: E402
from finetune.training.objectives.preference import Logps  # noqa: E402
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
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        theirs = float(trainer.compute_loss(model, batch))
    cfg = make_cfg(**{"train.objective": "dpo", "pref.loss_type": loss_type, "pref.label_smoothing": smoothing})
    assert ours(DPO(cfg), units_from(batch, 4), model) == pytest.approx(theirs, abs=1e-5)


def test_kto_equals_trl(tmp_path):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from finetune.training.objectives.kto import KTO

    model = make_model()
    model.eval()
    tok = load_tokenizer(make_cfg().model)
    rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
            for r in ROWS for side in ("chosen", "rejected")]
    args = KTOConfig(output_dir=str(tmp_path), beta=0.1, per_device_train_batch_size=8, report_to=[], use_cpu=True,
                     desirable_weight=1.0, undesirable_weight=1.0)
    trainer = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        theirs = float(trainer.compute_loss(model, batch))
    units = units_from(batch, 8, label=batch["label"])
    assert ours(KTO(make_cfg(**{"train.objective": "kto"})), units, model) == pytest.approx(theirs, abs=1e-5)


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
