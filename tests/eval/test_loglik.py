"""acc, acc_norm, plain-text loss and rolling perplexity on the tiny model, checked by hand."""

import math
from types import SimpleNamespace

import pytest
import torch

from finetune.eval import conventions as C
from finetune.eval import loglik as L
from finetune.eval.metrics import pick, rolling_scores
from finetune.eval.suites import Example


@pytest.fixture(scope="module")
def model_tok(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval(), \
        AutoTokenizer.from_pretrained(str(tiny_model))


def _task(**kw):
    base = dict(name="t", prompt="plain", target_delimiter=None, system_prompt=None, lm_eval=None, batch_size=3,
                metrics=["acc", "acc_norm"])
    return SimpleNamespace(**{**base, **kw})


def _logp(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def _by_hand(model, ctx, cont):
    lp = _logp(model, ctx + cont)
    return sum(float(lp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont))


def test_plain_choices_score_delimiter_and_option_after_the_prompt(model_tok):
    model, tok = model_tok
    ex = Example(messages=[{"role": "user", "content": "Question: Which is a fruit?\nAnswer:"}],
                 choices=["apple", "chair", "a river"], answer_index=0)
    got = L.choice_loglikelihoods(model, tok, _task(), [ex], None, show=False)[0]
    ctx = tok.encode("Question: Which is a fruit?\nAnswer:")
    for ll, c in zip(got, ex.choices):
        assert ll == pytest.approx(_by_hand(model, ctx, tok.encode(" " + c)), abs=1e-4)
    records = [{}]
    scores = L.score_choices(model, tok, _task(), [ex], None, records, show=False)
    assert scores["acc"] == (100.0 if records[0]["choice_pred"] == 0 else 0.0)
    assert records[0]["choice_pred_norm"] == pick(got, ex.choices, norm=True)


def test_acc_norm_divides_by_characters():
    # lm-eval: argmax(lls / len(choice)); the longer option wins per character here.
    assert pick([-4.0, -9.0], ["ab", "abcdefghij"], norm=False) == 0
    assert pick([-4.0, -9.0], ["ab", "abcdefghij"], norm=True) == 1


def test_rolling_scores_every_token_after_the_start_token(model_tok):
    model, tok = model_tok
    text = "The cat sat on the mat."
    [ll] = L.rolling_loglikelihoods(model, tok, [text], batch_size=2, show=False)
    ids = tok.encode(text)
    assert ll == pytest.approx(_by_hand(model, [C.prefix_token_id(tok)], ids), abs=1e-4)
    s = rolling_scores(["word_perplexity", "byte_perplexity", "bits_per_byte"], [ll], [text])
    assert s["word_perplexity"] == pytest.approx(math.exp(-ll / 6))
    assert s["byte_perplexity"] == pytest.approx(math.exp(-ll / len(text)))
    assert s["bits_per_byte"] == pytest.approx(-ll / len(text) / math.log(2))


def test_rolling_windows_past_the_context_length(model_tok, monkeypatch):
    model, tok = model_tok
    monkeypatch.setattr(C, "max_length", lambda m, t: 8)
    text = "abcdefghijklmnopqrst"  # 20 byte tokens: windows of 8, 8 and 4
    [ll] = L.rolling_loglikelihoods(model, tok, [text], batch_size=4, show=False)
    ids = tok.encode(text)
    want = sum(_by_hand(model, ctx, cont) for ctx, cont in C.rolling_windows(ids, C.prefix_token_id(tok), 8))
    assert ll == pytest.approx(want, abs=1e-4)


def test_plain_loss_is_the_answer_after_prompt_and_delimiter(model_tok):
    model, tok = model_tok
    ex = Example(messages=[{"role": "user", "content": "2+2="}], answer="4")
    records = [{}]
    s = L.score_loss(model, tok, _task(metrics=["loss", "perplexity"]), [ex], None, records, show=False)
    want = -_by_hand(model, tok.encode("2+2="), tok.encode(" 4")) / 2
    assert s["loss"] == pytest.approx(want, abs=1e-4) and s["perplexity"] == pytest.approx(math.exp(want))


def test_text_rows_take_only_rolling_metrics():
    from finetune.errors import UsageError

    rows = [Example(messages=[], text="abc")]
    L.check_rows(_task(metrics=["bits_per_byte"]), rows)
    with pytest.raises(UsageError, match="metric 'loss' needs rows with a prompt"):
        L.check_rows(_task(metrics=["loss"]), rows)
    with pytest.raises(UsageError, match="some rows have only 'text'"):
        L.check_rows(_task(metrics=["bits_per_byte"]), rows + [Example(messages=[{"role": "user", "content": "q"}])])
