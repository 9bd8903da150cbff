"""The CPU preference demo (scripts/pref_demo.sh, recipe demo-dpo): its self-made data, and (slow) the
whole demo: SFT demo adapter -> merged -> DPO, held-out win rate from about chance to >= 90%."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.data.preference_formats import read_preference_rows

ROOT = Path(__file__).resolve().parents[1]
COOL = {"blue", "green", "teal", "turquoise", "sea green", "navy blue"}


def colour(answer: dict) -> str:
    """'The roofs in Oru are sea green.' -> 'sea green'."""
    return re.search(r" (?:are|is) ([a-z ]+)\.$", answer["content"]).group(1)


def test_demo_pairs_differ_only_in_the_colour_and_heldout_is_disjoint():
    train = read_preference_rows(ROOT / "datasets/samples/demo_pref/train.json", what="data").examples
    held = read_preference_rows(ROOT / "eval/data/demo-pref.jsonl").examples
    assert (len(train), len(held)) == (64, 24)
    for ex in train + held:
        c, r = ex.chosen["content"], ex.rejected["content"]
        assert colour(ex.chosen) in COOL and colour(ex.rejected) not in COOL
        assert c.replace(colour(ex.chosen), "") == r.replace(colour(ex.rejected), "")
    town = lambda ex: ex.chosen["content"].split(" in ")[1].split(" ")[0]  # noqa: E731
    assert not {town(e) for e in train} & {town(e) for e in held}


@pytest.mark.slow
def test_demo_win_rate_rises_from_chance(tmp_path, monkeypatch):
    import finetune
    from finetune.merge import merge_adapter

    monkeypatch.chdir(ROOT)
    out = tmp_path / "demo"
    finetune.train("demo", **{"out_dir": str(out), "eval.suite": None, "output.progress": False})
    merge_adapter(str(out / "final"), str(out / "merged"))
    finetune.train("demo-dpo", **{"model.name": str(out / "merged"), "out_dir": str(out / "dpo"),
                                  "output.progress": False})
    subprocess.run([sys.executable, "scripts/pref_demo.py", str(out)], check=True, cwd=ROOT)
    scores = json.loads((out / "pref_scores.json").read_text())
    assert 20 <= scores["sft"]["win_rate"] <= 80  # about chance: nothing in the SFT data is about colours
    assert scores["dpo"]["win_rate"] >= 90
