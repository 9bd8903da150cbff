"""lm-evaluation-harness's plain-text conventions, restated in finetune.eval.conventions."""

from types import SimpleNamespace

import pytest

from finetune.config import DataConfig
from finetune.eval import conventions as C


def _task(**kw):
    base = dict(prompt="plain", target_delimiter=None, system_prompt=None, lm_eval=None, num_fewshot=None)
    return SimpleNamespace(**{**base, **kw})


def test_rolling_windows_are_lm_evals_docstring_example():
    # lm_eval.api.model.LM.loglikelihood_rolling's docstring: tokens 0..9, max length 4.
    got = C.rolling_windows(list(range(10)), prefix=-1, max_len=4)
    assert got == [([-1], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]), ([5, 6, 7], [8, 9])]
    assert [t for _, w in got for t in w] == list(range(10))  # every token scored once
    assert C.rolling_windows([7, 8], prefix=0, max_len=4) == [([0], [7, 8])]
    assert C.rolling_windows([], prefix=0, max_len=4) == []


def test_every_window_fits_the_models_context():
    for n in range(1, 30):
        for ctx, cont in C.rolling_windows(list(range(n)), prefix=-1, max_len=5):
            assert len(ctx) + len(cont) - 1 <= 5  # the inputs (the last token is only a target)


def test_delimiter_rule():
    assert C.delimiter(_task()) == " "
    assert C.delimiter(_task(target_delimiter="\n")) == "\n"
    assert C.delimiter(_task(prompt="chat")) == ""  # lm-eval drops it under a chat template


def test_encode_pair_moves_trailing_space_and_splits_the_whole(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    ctx, cont = C.encode_pair(tok, "Answer: ", "Paris")
    assert ctx == tok.encode("Answer:") and cont == tok.encode(" Paris")
    assert C.encode_pair(tok, "", "ab") == ([C.prefix_token_id(tok)], tok.encode("ab"))
    assert C.prefix_token_id(tok) == tok.eos_token_id  # the tiny tokenizer has no BOS


def test_plain_prompt_system_and_turns():
    msgs = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    assert C.plain_prompt(_task(), msgs) == "Q1\n\nA1\n\nQ2"
    assert C.plain_prompt(_task(system_prompt="Be brief."), msgs[:1]) == "Be brief.\n\nQ1"
    own = [{"role": "system", "content": "Mine."}, *msgs[:1]]
    assert C.plain_prompt(_task(system_prompt="Be brief."), own) == "Mine.\n\nQ1"


def test_describe_and_label():
    cfg = DataConfig(system_prompt="You are terse.")
    chat = C.describe(_task(prompt="chat"), cfg)
    assert chat["system_prompt"] == "You are terse." and chat["num_fewshot"] == 0
    assert C.label(chat).startswith('chat template, system prompt "You are terse.", 0-shot')
    plain = C.describe(_task(), cfg)  # plain mode: lm-eval's, no recipe system prompt
    assert plain["system_prompt"] is None and plain["target_delimiter"] == " "
    harness = C.describe(_task(lm_eval="arc_easy", num_fewshot=5), cfg)
    assert harness["num_fewshot"] == 5 and "lm-evaluation-harness" in C.label(harness)
    assert C.describe(_task(lm_eval="arc_easy"), cfg, num_fewshot=25)["num_fewshot"] == 25
