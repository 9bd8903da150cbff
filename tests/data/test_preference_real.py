"""Preference data on real rows (../shared/data/preference, skipped when absent) and the dataset cards."""

import pytest
from conftest import SHARED
from helpers import IM_END

from finetune.config import DataConfig
from finetune.data.preference import prepare_preference
from finetune.data.sources import read_card

DPO = SHARED / "preference" / "dpo_en_demo.json"
KTO = SHARED / "preference" / "kto_en_demo.json"


def prep(tok, paired=True, **kw):
    return prepare_preference(DataConfig(val_fraction=0.0, seq_len=1024, **kw), tok, paired=paired, seed=0,
                              progress=False)


@pytest.mark.skipif(not DPO.is_file(), reason="../shared/data/preference not present")
def test_dpo_en_demo_through_its_card_every_pair_kept(tok):
    b = prep(tok, card="dpo-en-demo")
    assert b.stats.rows_loaded == 300 and b.stats.dropped == {} and len(b.train) == 300
    assert all(u["chosen_ids"][-1] == IM_END or b.stats.truncated for u in b.train)
    assert all(len(u["prompt_ids"]) + max(len(u["chosen_ids"]), len(u["rejected_ids"])) <= 1024 for u in b.train)
    assert b.stats.truncated > 0  # the byte tokenizer makes long pairs: the policy ran


@pytest.mark.skipif(not KTO.is_file(), reason="../shared/data/preference not present")
def test_kto_en_demo_labels(tok):
    b = prep(tok, paired=False, card="kto-en-demo")
    assert len(b.train) == 300 and sum(u["label"] for u in b.train) == 150


@pytest.mark.skipif(not DPO.is_file(), reason="../shared/data/preference not present")
def test_dpo_en_demo_as_unpaired_feedback_for_kto(tok):
    b = prep(tok, paired=False, path=str(DPO))
    assert len(b.train) == 600 and sum(u["label"] for u in b.train) == 300


@pytest.mark.parametrize("name,fmt", [("ultrafeedback-binarized", "trl"), ("orca-dpo-pairs", "trl"),
                                      ("dpo-en-demo", "sharegpt"), ("kto-en-demo", "messages"),
                                      ("sample-preference", "sharegpt")])
def test_cards_parse(name, fmt):
    card, _ = read_card(name)
    assert card.format == fmt and card.source
