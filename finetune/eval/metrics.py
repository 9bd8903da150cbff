"""Scoring functions for generated text and the per-task aggregation.

Every generation metric is reported on a 0-100 scale (higher is better) so the scorecard and the
bar chart read the same way; loss and the perplexities are raw (lower is better). The text metrics
are the maintained libraries' (rouge-score, sacrebleu), not re-implementations.

Multiple choice: `acc` (alias `choice`) picks the option with the highest summed log-likelihood,
`acc_norm` the highest log-likelihood per character of the option (lm-evaluation-harness's
definitions). The rolling metrics are lm-evaluation-harness's `loglikelihood_rolling` perplexities
of a whole plain text: `word_perplexity`, `byte_perplexity`, `bits_per_byte`. The preference
metrics (`reward_accuracy`, `reward_margin`, `win_rate`) are finetune.eval.preference's.
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
CHOICE_METRICS = ("choice", "acc", "acc_norm")
ROLLING_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
PREFERENCE_METRICS = ("reward_accuracy", "reward_margin", "win_rate")
METRICS = LOSS_METRICS + GENERATION_METRICS + CHOICE_METRICS + ROLLING_METRICS + PREFERENCE_METRICS
LOWER_IS_BETTER = frozenset(LOSS_METRICS + ROLLING_METRICS)

# What each number is, in the scorecard's words: its unit or normalisation. `loss` and `perplexity`
# depend on the prompt convention (the training masking in chat mode); see metric_unit.
UNITS = {
    "exact_match": "% of answers equal to the reference or an alias (normalised)",
    "contains": "% of answers containing a keyword, the reference or an alias (normalised)",
    "rouge_l": "ROUGE-L F x 100 (rouge-score, stemmed), mean over rows",
    "chrf": "corpus chrF (sacrebleu)",
    "bleu": "corpus BLEU (sacrebleu)",
    "choice": "% right, option of highest summed log-likelihood (lm-eval acc)",
    "acc": "% right, option of highest summed log-likelihood (lm-eval acc)",
    "acc_norm": "% right, option of highest log-likelihood per character of the option (lm-eval acc_norm)",
    "word_perplexity": "exp(-sum log-likelihood / words), lm-eval rolling loglikelihood, start token prepended",
    "byte_perplexity": "exp(-sum log-likelihood / UTF-8 bytes), lm-eval rolling loglikelihood",
    "bits_per_byte": "-sum log-likelihood / UTF-8 bytes / ln 2, lm-eval rolling loglikelihood",
    "reward_accuracy": "% of pairs whose implicit DPO reward beta*(log pi - log pi_ref) is higher for the chosen "
                       "answer (strictly: the reference itself scores 0)",
    "reward_margin": "mean reward of chosen minus rejected, beta*(log pi - log pi_ref) summed over answer tokens",
    "win_rate": "% of pairs whose chosen answer has the higher mean log-prob per answer token (no reference)",
}


def metric_unit(metric: str, prompt: str = "chat") -> str:
    """The unit of `metric` under a task's prompt convention (chat or plain)."""
    if metric in LOSS_METRICS:
        where = ("answer token, end-of-turn included, after the chat-template prompt (the training masking)"
                 if prompt == "chat" else "answer token after the plain prompt and delimiter (lm-eval loglikelihood)")
        return f"nats per {where}" if metric == "loss" else f"exp(loss), per {where}"
    return UNITS.get(metric, "")


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


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for word_perplexity."""
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def rolling_scores(metrics: Sequence[str], loglikelihoods: Sequence[float], texts: Sequence[str]) -> dict:
    """lm-evaluation-harness's corpus aggregation of rolling log-likelihoods: the sums over all texts
    divided by the total words or bytes (weighted_perplexity, bits_per_byte)."""
    ll = sum(loglikelihoods)
    words, nbytes = sum(count_words(t) for t in texts), sum(count_bytes(t) for t in texts)
    out = {"word_perplexity": perplexity(-ll / words), "byte_perplexity": perplexity(-ll / nbytes),
           "bits_per_byte": -ll / nbytes / math.log(2)}
    return {m: out[m] for m in metrics if m in out}


def pick(loglikelihoods: Sequence[float], choices: Sequence[str], norm: bool) -> int:
    """The option picked: highest log-likelihood (acc), or per character of the option (acc_norm,
    lm-eval's length in characters of the choice without its delimiter). Ties go to the first."""
    vals = [ll / max(len(c), 1) if norm else ll for ll, c in zip(loglikelihoods, choices)]
    return max(range(len(vals)), key=lambda k: vals[k])


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
