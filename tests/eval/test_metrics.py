"""Metrics against values worked out by hand."""

import math
from types import SimpleNamespace

import pytest

from finetune.eval import metrics as M


def test_normalize_drops_case_punctuation_articles_and_spaces():
    assert M.normalize("  The  Capital, of France!! ") == "capital of france"
    assert M.normalize("An apple.") == "apple"


def test_exact_match_uses_answer_and_aliases():
    assert M.exact_match("Paris.", ["paris"]) == 100.0
    assert M.exact_match("the four", ["4", "Four"]) == 100.0
    assert M.exact_match("Paris is it", ["Paris"]) == 0.0


def test_contains_is_word_bounded_and_normalised():
    assert M.contains("I think it is PARIS, really", ["paris"]) == 100.0
    assert M.contains("Parisian food", ["Paris"]) == 0.0
    assert M.contains("answer => 8700 cm.", ["=> 8700 cm"]) == 100.0
    assert M.contains("anything", ["", "!!"]) == 0.0


def test_rouge_l_hand_computed():
    # LCS("the cat sat", "the cat on the mat") = "the cat" (2 tokens): P = 2/3, R = 2/5, F = 2PR/(P+R) = 0.5
    assert M.rouge_l("the cat sat", "the cat on the mat") == pytest.approx(50.0)
    assert M.rouge_l("same words", "same words") == pytest.approx(100.0)


def test_chrf_and_bleu_perfect_and_disjoint():
    assert M.chrf(["hello world"], ["hello world"]) == pytest.approx(100.0)
    assert M.chrf(["xyz"], ["abc"]) == pytest.approx(0.0)
    assert M.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)


def test_perplexity_is_exp_of_token_mean_and_saturates():
    assert M.perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert M.perplexity(1000.0) == float("inf")


def test_score_generations_aggregates_and_per_example():
    ex = [SimpleNamespace(answer="Paris", aliases=[], keywords=["paris"]),
          SimpleNamespace(answer="4", aliases=["four"], keywords=[])]
    agg, per = M.score_generations(["exact_match", "contains"], ["paris", "it is four"], ex)
    assert agg == {"exact_match": 50.0, "contains": 100.0}
    assert per == [{"exact_match": 100.0, "contains": 100.0}, {"exact_match": 0.0, "contains": 100.0}]


def test_unknown_metric_lists_close_matches():
    from finetune.errors import UsageError

    with pytest.raises(UsageError, match="did you mean exact_match"):
        M.check_metric("exact_mach", "suite x")
