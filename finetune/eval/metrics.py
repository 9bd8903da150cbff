"""Scoring functions for generated text and the per-task aggregation.

Every generation metric is reported on a 0-100 scale (higher is better) so the scorecard and the
bar chart read the same way; loss and perplexity are raw (lower is better). The text metrics are
the maintained libraries' (rouge-score, sacrebleu), not re-implementations.
"""

from __future__ import annotations

import math
import re
import string
from typing import Iterable, Sequence

from finetune.errors import UsageError, did_you_mean
from finetune.resources import install_hint

LOSS_METRICS = ("loss", "perplexity")
GENERATION_METRICS = ("exact_match", "contains", "rouge_l", "chrf", "bleu")
CHOICE_METRICS = ("choice",)
METRICS = LOSS_METRICS + GENERATION_METRICS + CHOICE_METRICS
LOWER_IS_BETTER = frozenset(LOSS_METRICS)


def check_metric(name: str, where: str) -> str:
    if name not in METRICS:
        raise UsageError(f"{where}: unknown metric '{name}'{did_you_mean(name, METRICS)}; "
                         f"known: {', '.join(METRICS)}")
    return name


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD-style answer normalisation: lowercase, drop punctuation and articles, squeeze spaces."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: Iterable[str]) -> float:
    """100 when the normalised prediction equals any normalised reference (answer or alias), else 0."""
    pred = normalize(prediction)
    return 100.0 if any(pred == normalize(r) for r in references if r is not None) else 0.0


def contains(prediction: str, needles: Iterable[str]) -> float:
    """100 when any normalised keyword/answer occurs in the normalised prediction (word-bounded)."""
    pred = f" {normalize(prediction)} "
    for needle in needles:
        n = normalize(needle or "")
        if n and f" {n} " in pred:
            return 100.0
    return 0.0


_ROUGE = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure x 100 (rouge-score, with its Porter stemmer)."""
    global _ROUGE
    if _ROUGE is None:
        try:  # an optional extra (finetune[eval]), so imported where a suite asks for it
            from rouge_score import rouge_scorer
        except ImportError:
            raise UsageError(f"metric rouge_l needs rouge-score: {install_hint('eval')}") from None
        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return 100.0 * _ROUGE.score(reference, prediction)["rougeL"].fmeasure


def _sacrebleu():
    try:  # an optional extra (finetune[eval]), so imported where a suite asks for it
        import sacrebleu
    except ImportError:
        raise UsageError(f"metrics chrf/bleu need sacrebleu: {install_hint('eval')}") from None
    return sacrebleu


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu, 0-100)."""
    return float(_sacrebleu().corpus_chrf(list(predictions), [list(references)]).score)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, 0-100)."""
    return float(_sacrebleu().corpus_bleu(list(predictions), [list(references)]).score)


def sentence_chrf(prediction: str, reference: str) -> float:
    return float(_sacrebleu().sentence_chrf(prediction, [reference]).score)


def sentence_bleu(prediction: str, reference: str) -> float:
    return float(_sacrebleu().sentence_bleu(prediction, [reference]).score)


def perplexity(mean_loss: float) -> float:
    # exp overflows past ~709; an infinite perplexity is the honest value there.
    return math.exp(mean_loss) if mean_loss < 700 else float("inf")


def score_generations(metrics: Sequence[str], predictions: Sequence[str], examples: Sequence) -> tuple[dict, list[dict]]:
    """Aggregate scores (0-100) and per-example scores for the generation metrics asked for.

    `examples` carry .answer, .aliases and .keywords. chrF and BLEU are corpus-level (as sacrebleu
    intends); their per-example values are sentence-level and only for reading the generations.
    """
    per_example: list[dict] = [{} for _ in predictions]
    totals: dict[str, float] = {}
    refs = [ex.answer or "" for ex in examples]
    for m in metrics:
        if m == "exact_match":
            vals = [exact_match(p, [ex.answer, *ex.aliases]) for p, ex in zip(predictions, examples)]
        elif m == "contains":
            vals = [contains(p, [*(ex.keywords or []), ex.answer, *ex.aliases]) for p, ex in zip(predictions, examples)]
        elif m == "rouge_l":
            vals = [rouge_l(p, r) for p, r in zip(predictions, refs)]
        elif m == "chrf":
            vals = [sentence_chrf(p, r) for p, r in zip(predictions, refs)]
            totals[m] = chrf(predictions, refs) if predictions else 0.0
        elif m == "bleu":
            vals = [sentence_bleu(p, r) for p, r in zip(predictions, refs)]
            totals[m] = bleu(predictions, refs) if predictions else 0.0
        else:
            continue
        for d, v in zip(per_example, vals):
            d[m] = round(v, 4)
        totals.setdefault(m, sum(vals) / len(vals) if vals else 0.0)
    return totals, per_example
