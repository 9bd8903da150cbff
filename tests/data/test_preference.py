"""prepare_preference: units, what counts (exactly SFT's trained tokens), split, cache, length policy."""

import json

import pytest
from helpers import IM_END, IM_START, B

from finetune.config import DataConfig
from finetune.data.formats import BadRow, Conversation
from finetune.data.pipeline import get_renderer
from finetune.data.preference import fit_lengths, prepare_preference
from finetune.errors import UsageError


def write(tmp_path, rows, name="pairs.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def pair(q, c, r, **extra):
    return {"conversations": [{"from": "human", "value": q}], "chosen": {"from": "gpt", "value": c},
            "rejected": {"from": "gpt", "value": r}, **extra}


def prep(path, tok, paired=True, **kw):
    kw.setdefault("val_fraction", 0.0)
    return prepare_preference(DataConfig(path=path, **kw), tok, paired=paired, seed=0, progress=False)


def test_pair_by_hand(tok, tmp_path):
    b = prep(write(tmp_path, [pair("Hi", "Yo", "No")]), tok)
    (u,) = b.train
    assert u == {"prompt_ids": [IM_START] + B("user\nHi") + [IM_END] + B("\n") + [IM_START] + B("assistant\n"),
                 "chosen_ids": B("Yo") + [IM_END], "rejected_ids": B("No") + [IM_END]}
    assert b.stats.kind == "pairs" and b.stats.examples == 1 and b.stats.trained_tokens == 6


def test_answer_ids_are_what_sft_trains_for_that_turn(tok, tmp_path):
    rows = json.load(open("datasets/samples/preference_sample.json"))
    b = prep(write(tmp_path, rows), tok, seq_len=4096)
    cfg = DataConfig()
    r = get_renderer(tok, cfg)
    assert len(b.train) == len(rows)
    from finetune.data.preference_formats import pref_columns, to_preference

    by_prompt = {}
    for row in rows:
        ex = to_preference(row, "sharegpt", pref_columns("sharegpt"))
        by_prompt[tuple(r.encode([r.prompt_text(ex.prompt)], [[]])[0][0])] = ex
    for u in b.train:
        ex = by_prompt[tuple(u["prompt_ids"])]
        for side, answer in (("chosen_ids", ex.chosen), ("rejected_ids", ex.rejected)):
            conv = Conversation(messages=[*ex.prompt.messages, answer], system=ex.prompt.system)
            ids, labels = r.tokenize(conv)  # the SFT path: every assistant turn trained
            last = [t for t, lab in zip(ids, labels) if lab != -100][-len(u[side]):]
            assert u[side] == last and u[side][-1] == IM_END
            assert ids[:len(u["prompt_ids"]) + len(u[side])] == u["prompt_ids"] + u[side]


def test_shipped_card_and_split(tok):
    b = prepare_preference(DataConfig(card="sample-preference", val_fraction=0.25), tok, paired=True, seed=1,
                           progress=False)
    assert (b.stats.examples, b.stats.val_examples) == (36, 12)
    assert b.stats.dropped == {}


def test_unpaired_from_pairs_and_from_labels(tok, tmp_path):
    b = prep(write(tmp_path, [pair("Hi", "Yo", "No")]), tok, paired=False)
    assert [(u["completion_ids"], u["label"]) for u in b.train] == [(B("Yo") + [IM_END], True),
                                                                    (B("No") + [IM_END], False)]
    kto = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": False}]
    (u,) = prep(write(tmp_path, kto, "kto.jsonl"), tok, paired=False).train
    assert u["completion_ids"] == B("a") + [IM_END] and u["label"] is False
    assert "0 desirable, 1 undesirable" in str(prep(write(tmp_path, kto, "kto.jsonl"), tok, paired=False).stats)


def test_pair_objective_refuses_unpaired_feedback(tok, tmp_path):
    kto = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": True}]
    with pytest.raises(UsageError, match="unpaired feedback .*train.objective=kto"):
        prep(write(tmp_path, kto), tok)


def test_cache_returns_the_same_units(tok, tmp_path):
    path = write(tmp_path, [pair(f"q{i}", f"c{i}", f"r{i}") for i in range(5)])
    a = prep(path, tok, val_fraction=0.2)
    b = prep(path, tok, val_fraction=0.2)
    assert b.stats.cached and not a.stats.cached
    assert (a.train, a.val) == (b.train, b.val)
    k1 = prep(path, tok, paired=False, val_fraction=0.2)
    assert not k1.stats.cached and len(k1.train) == 8


def test_train_on_prompt_refused(tok, tmp_path):
    with pytest.raises(UsageError, match="train_on_prompt"):
        prep(write(tmp_path, [pair("a", "b", "c")]), tok, train_on_prompt=True)


# ------------------------------------------------------------------------------ length policy


def test_fits_untouched():
    assert fit_lengths([1, 2], [[3], [4, 5]], 4) == ([1, 2], [[3], [4, 5]], False)


def test_prompt_cut_from_the_left_only_as_far_as_needed():
    prompt, answers, cut = fit_lengths(list(range(10)), [[1, 2, 3], [4]], 8)
    assert cut and prompt == [5, 6, 7, 8, 9] and answers == [[1, 2, 3], [4]]


def test_prompt_keeps_half_then_answers_cut_on_the_right():
    prompt, answers, cut = fit_lengths(list(range(10)), [list(range(100, 120)), [7]], 8)
    assert prompt == [6, 7, 8, 9] and answers == [[100, 101, 102, 103], [7]]


def test_drop_mode():
    with pytest.raises(BadRow, match="too long"):
        fit_lengths([1] * 6, [[2] * 4], 8, "drop")


def test_truncation_counted_and_prompt_end_kept(tok, tmp_path):
    long_q = "x" * 200 + "END?"
    b = prep(write(tmp_path, [pair(long_q, "yes", "no")]), tok, seq_len=64)
    (u,) = b.train
    assert b.stats.truncated == 1
    assert len(u["prompt_ids"]) + 4 <= 64
    assert tok.decode(u["prompt_ids"]).endswith("END?<|im_end|>\n<|im_start|>assistant\n")
    assert u["chosen_ids"] == B("yes") + [IM_END]
