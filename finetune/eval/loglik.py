"""The log-likelihood metrics of a task: multiple choice (acc, acc_norm), answer loss in plain mode,
and lm-eval's rolling perplexities of whole texts. Every one scores token continuations after a
context with finetune.eval.generate.pair_logprobs; finetune.eval.conventions says how text becomes
those tokens in each prompt convention.
"""

from __future__ import annotations

from finetune.errors import FinetuneError, UsageError
from finetune.eval import conventions as C
from finetune.eval import generate as G
from finetune.eval.metrics import ROLLING_METRICS, perplexity, pick, rolling_scores
from finetune.eval.prompting import loss_ids, prompt_ids

CHOICE_KEYS = {"choice": "choice", "acc": "acc", "acc_norm": "acc_norm"}


def check_rows(task, examples) -> None:
    """Rows and metrics agree (before any model loads): rows with only 'text' take the rolling
    perplexities, and a task has one kind of row."""
    texts = [ex.text is not None for ex in examples]
    data = getattr(task, "data_path", None) or getattr(task, "data", None)
    where = f"task '{task.name}'" + (f" ({data})" if data else "")
    if all(texts):
        bad = next((m for m in task.metrics if m not in ROLLING_METRICS), None)
        if bad:
            raise UsageError(f"{where}: metric '{bad}' needs rows with a prompt; rows with only 'text' "
                             f"take {', '.join(ROLLING_METRICS)}")
    elif any(texts):
        raise UsageError(f"{where}: some rows have only 'text' and some a prompt; use one kind per task")


def choice_pairs(tok, task, example, data_cfg) -> list[tuple[list[int], list[int]]]:
    """(context ids, option ids) per option of one multiple-choice row, in the task's convention."""
    if task.prompt == "plain":
        ctx = C.plain_prompt(task, example.messages)
        return [C.encode_pair(tok, ctx, C.delimiter(task) + c) for c in example.choices]
    p = prompt_ids(example, tok, data_cfg)
    return [(p, tok.encode(c, add_special_tokens=False)) for c in example.choices]


def choice_loglikelihoods(model, tok, task, examples, data_cfg, show: bool = True) -> list[list[float]]:
    pairs, owner = [], []
    for i, ex in enumerate(examples):
        for pair in choice_pairs(tok, task, ex, data_cfg):
            pairs.append(pair)
            owner.append(i)
    out: list[list[float]] = [[] for _ in examples]
    lls = G.pair_logprobs(model, tok, pairs, task.batch_size, show, desc=f"{task.name} choices")
    for i, (ll, _) in zip(owner, lls):
        out[i].append(ll)
    return out


def score_choices(model, tok, task, examples, data_cfg, records, show: bool = True) -> dict:
    """acc / choice (summed log-likelihood) and acc_norm (per character of the option), 0-100."""
    mc = [(i, ex) for i, ex in enumerate(examples) if ex.choices]
    if not mc:
        raise UsageError(f"task '{task.name}': the choice metrics need rows with 'choices'")
    lps = choice_loglikelihoods(model, tok, task, [ex for _, ex in mc], data_cfg, show)
    right = {"raw": 0, "norm": 0}
    for (i, ex), lp in zip(mc, lps):
        pred, pred_norm = pick(lp, ex.choices, False), pick(lp, ex.choices, True)
        right["raw"] += pred == ex.answer_index
        right["norm"] += pred_norm == ex.answer_index
        records[i].update(choice_logprobs=[round(x, 4) for x in lp], choice_pred=pred,
                          choice_correct=pred == ex.answer_index, choice_pred_norm=pred_norm)
    out = {}
    for m in task.metrics:
        if m in CHOICE_KEYS:
            out[m] = 100.0 * right["norm" if m == "acc_norm" else "raw"] / len(mc)
    return out



def plain_loss(model, tok, task, examples, show: bool = True) -> list[tuple[float, int]]:
    """(NLL, tokens) of each answer after its plain prompt: lm-eval's loglikelihood request."""
    pairs = [C.encode_pair(tok, C.plain_prompt(task, ex.messages), C.delimiter(task) + (ex.answer or ""))
             for ex in examples]
    return [(-ll, n) for ll, n in G.pair_logprobs(model, tok, pairs, task.batch_size, show,
                                                   desc=f"{task.name} loss", unit="rows")]


def text_of(task, example) -> str:
    """The whole text a rolling metric scores: the row's text, or prompt + delimiter + answer."""
    if example.text is not None:
        return example.text
    return C.plain_prompt(task, example.messages) + C.delimiter(task) + (example.answer or "")


def rolling_loglikelihoods(model, tok, texts: list[str], batch_size: int, desc: str = "rolling",
                           show: bool = True) -> list[float]:
    """Summed log-likelihood of every token of each text (lm-eval's loglikelihood_rolling)."""
    prefix, max_len = C.prefix_token_id(tok), C.max_length(model, tok)
    pairs, owner = [], []
    for i, text in enumerate(texts):
        for w in C.rolling_windows(C.encode(tok, text), prefix, max_len):
            pairs.append(w)
            owner.append(i)
    out = [0.0] * len(texts)
    for i, (ll, _) in zip(owner, G.pair_logprobs(model, tok, pairs, batch_size, show, desc=desc, unit="windows")):
        out[i] += ll
    return out


def score_rolling(model, tok, task, examples, records, show: bool = True) -> dict:
    texts = [text_of(task, ex) for ex in examples]
    lls = rolling_loglikelihoods(model, tok, texts, task.batch_size, f"{task.name} rolling", show)
    for r, ll in zip(records, lls):
        r["loglikelihood"] = round(ll, 4)
    return rolling_scores([m for m in task.metrics if m in ROLLING_METRICS], lls, texts)


def score_loss(model, tok, task, examples, data_cfg, records, show: bool = True) -> dict:
    """loss / perplexity per answer token: the training masking (chat) or after the plain prompt."""
    if task.prompt == "plain":
        nll = plain_loss(model, tok, task, examples, show)
    else:
        seqs = [loss_ids(ex, tok, data_cfg) for ex in examples]
        nll = G.sequence_nll(model, seqs, G.pad_id_of(tok), task.batch_size, desc=f"{task.name} loss", show=show)
    total, count = sum(s for s, _ in nll), sum(c for _, c in nll)
    if count == 0:
        raise FinetuneError(f"task '{task.name}': no answer tokens to measure loss on (all truncated?)")
    mean = total / count  # token-weighted, as in training
    for r, (s, c) in zip(records, nll):
        r["loss"] = round(s / c, 5) if c else None
    out = {}
    if "loss" in task.metrics:
        out["loss"] = mean
    if "perplexity" in task.metrics:
        out["perplexity"] = perplexity(mean)
    return out
