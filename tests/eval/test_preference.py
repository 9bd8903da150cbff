"""Preference tasks: held-out pairs scored against a reference, on the tiny model and LoRA adapters."""

import pytest

from finetune.config import DataConfig
from finetune.errors import UsageError
from finetune.eval import evaluate
from finetune.eval import preference as P
from finetune.resources import resource_dir

PAIRS = str(resource_dir("eval") / "data" / "pref-sample.jsonl")


def test_pair_tokens_are_the_tokens_dpo_trains_on(tiny_model):
    from transformers import AutoTokenizer

    from finetune.data.preference import prepare_preference
    from finetune.eval.suites import load_suite

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    task = load_suite("tiny-pref").tasks[0]
    cfg = DataConfig(path=PAIRS, val_fraction=0.0, cache=False, seq_len=task.seq_len, system_prompt="Answer briefly.")
    got = P.pair_ids(tok, task, P.load_pairs(task, cfg), cfg)
    train = prepare_preference(cfg, tok, paired=True, seed=0, progress=False).train
    want = {(tuple(u["prompt_ids"]), tuple(u["chosen_ids"]), tuple(u["rejected_ids"])) for u in train}
    assert {tuple(map(tuple, g)) for g in got} == want and len(got) == 20
    assert "Answer briefly." in tok.decode(got[0][0])  # the recipe's system prompt, as in training


def test_scores_by_hand():
    policy = [(-10.0, 5, -12.0, 4), (-8.0, 4, -6.0, 2)]      # chosen sum, tokens, rejected sum, tokens
    reference = [(-11.0, 5, -11.0, 4), (-8.0, 4, -7.0, 2)]
    s = P.pref_scores(["reward_accuracy", "reward_margin", "win_rate"], policy, reference, beta=0.5)
    # rewards: pair 1 chosen +0.5, rejected -0.5 (margin 1.0); pair 2 chosen 0, rejected +0.5 (margin -0.5)
    # per token: -2.0 vs -3.0 in both pairs, so the chosen answer wins both, though its sum loses in pair 2
    assert s == {"reward_accuracy": 50.0, "reward_margin": pytest.approx(0.25), "win_rate": 100.0}
    assert P.pref_scores(["win_rate"], [(-10.0, 5, -3.0, 3)], None, 0.1) == {"win_rate": 0.0}
    assert P.pref_scores(["reward_accuracy"], policy, policy, 0.1) == {"reward_accuracy": 0.0}  # ties are not wins


@pytest.mark.slow
def test_reference_base_from_the_column_the_adapter_and_an_extra_load(tiny_model, tiny_adapter, tmp_path):
    a = str(tiny_adapter)
    both = evaluate("tiny-pref", ["base", a], tmp_path / "1", device="cpu", show=False, n=6)
    name = both["models"][1]["name"]
    assert both["scores"]["base"]["pairs/reward_accuracy"] == 0.0  # the reference against itself
    assert both["scores"]["base"]["pairs/reward_margin"] == 0.0
    # No base column: the adapter's base comes from the model in memory with the adapter disabled.
    alone = evaluate("tiny-pref", [a], tmp_path / "2", device="cpu", show=False, n=6)
    for m in ("reward_accuracy", "reward_margin", "win_rate", "loss"):
        assert alone["scores"][name][f"pairs/{m}"] == pytest.approx(both["scores"][name][f"pairs/{m}"], abs=1e-6), m
    # The adapter as the reference, loaded after the columns: the base's rewards mirror the adapter's.
    rev = evaluate("tiny-pref", ["base"], tmp_path / "3", device="cpu", show=False, n=6, reference=a,
                   base_model=str(tiny_model))
    assert rev["scores"]["base"]["pairs/reward_margin"] == pytest.approx(-both["scores"][name]["pairs/reward_margin"],
                                                                          abs=1e-6)
    assert rev["tasks"]["pairs"]["convention"]["reference"] == a
    assert both["tasks"]["pairs"]["convention"]["reference"] == "base"


def test_base_and_adapter_rewards(tiny_adapter, tmp_path):
    (tmp_path / "s.yaml").write_text(f"name: p\ntasks:\n  - {{name: pairs, data: {PAIRS}, format: preference, "
                                     f"metrics: [reward_accuracy, reward_margin, win_rate]}}\n")
    card = evaluate(str(tmp_path / "s.yaml"), ["base", str(tiny_adapter)], tmp_path / "ev", device="cpu", show=False,
                    n=5)
    base, adapter = card["scores"]["base"], card["scores"][card["models"][1]["name"]]
    assert base["pairs/reward_accuracy"] == 0.0 and base["pairs/reward_margin"] == 0.0
    assert adapter["pairs/reward_margin"] != 0.0 and 0.0 <= adapter["pairs/reward_accuracy"] <= 100.0
    assert base["pairs/win_rate"] * 5 / 100 == pytest.approx(round(base["pairs/win_rate"] * 5 / 100))


@pytest.mark.slow
def test_the_shipped_suite_scores_base_and_adapter_side_by_side(tiny_adapter, tmp_path):
    card = evaluate("tiny-pref", ["base", str(tiny_adapter)], tmp_path / "ev", device="cpu", show=False, n=4)
    keys = [r["key"] for r in card["rows"]]
    assert keys == ["pairs/reward_accuracy", "pairs/reward_margin", "pairs/win_rate", "pairs/loss", "pairs/rouge_l",
                    "pairs/chrf"]
    for col in card["scores"].values():
        assert all(v is not None for v in col.values())
        assert col["pairs/win_rate"] * 4 / 100 == pytest.approx(round(col["pairs/win_rate"] * 4 / 100))
    md = (tmp_path / "ev" / "scores.md").read_text()
    assert "reference base, beta 0.1" in md


@pytest.mark.parametrize("body,match", [
    ("  - {name: p, data: PAIRS, metrics: [reward_accuracy]}\n", "needs format: preference"),
    ("  - {name: p, data: PAIRS, format: preference, metrics: [acc]}\n", "'acc' does not apply to preference pairs"),
    ("  - {name: p, data: PAIRS, format: preference, prompt: plain, metrics: [win_rate]}\n", "drop prompt: plain"),
    ("  - {name: p, data: PAIRS, format: preference, metrics: [win_rate], beta: 0}\n", "beta must be > 0"),
])
def test_bad_preference_tasks(tmp_path, body, match):
    from finetune.eval.suites import load_suite

    (tmp_path / "s.yaml").write_text("tasks:\n" + body.replace("PAIRS", PAIRS))
    with pytest.raises(UsageError, match=match):
        load_suite(str(tmp_path / "s.yaml"))


def test_reference_must_be_an_adapter_and_base_must_be_known(tiny_model, tmp_path):
    with pytest.raises(UsageError, match="reference .* is not an adapter directory"):
        evaluate("tiny-pref", ["base"], tmp_path / "o", base_model=str(tiny_model), reference=str(tmp_path))
    with pytest.raises(UsageError, match="reference base, but no base model is known"):
        evaluate("tiny-pref", [str(tiny_model)], tmp_path / "o")
    assert not (tmp_path / "o").exists()
