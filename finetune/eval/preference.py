"""Preference tasks: held-out pairs scored for any checkpoint (base, SFT adapter, DPO adapter)
against a reference policy, beside the generation metrics on the same prompts.

    - name: pairs
      data: data/pref-sample.jsonl   # any preference format finetune.data reads (detected)
      format: preference
      metrics: [reward_accuracy, reward_margin, win_rate, rouge_l]
      reference: base                # or an adapter dir: the SFT adapter DPO started from
      beta: 0.1

Pairs are read by finetune.data.preference_formats.read_preference_rows and tokenized exactly as
DPO trains on them (finetune.data.preference.encode_example: the prompt rendered once through the
chat template, each answer's tokens with their end-of-turn token, the same length policy). Each
side's log-probability is scored by the multiple-choice path (generate.pair_logprobs).

- reward_accuracy: % of pairs whose implicit reward beta * (log pi(y|x) - log pi_ref(y|x)) is
  higher for the chosen answer (strictly, as TRL and training log it: the reference scored against
  itself has every reward 0, so 0%).
- reward_margin: mean reward of chosen minus rejected.
- win_rate: % of pairs whose chosen answer has the higher mean log-prob per token (length-
  normalised, no reference: the base's number is its own preference, chance is about 50%).
- generation and loss metrics score the chosen answer as the reference answer.

The reference's log-probs come from where they cost least: the base column itself, an adapter's
base with the adapter disabled (peft's disable_adapter), the reference adapter when it is one of
the columns, else one extra load after the others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from finetune.data.formats import BadRow
from finetune.data.pipeline import get_renderer
from finetune.data.preference import encode_example, fit_lengths
from finetune.data.preference_formats import PrefExample, read_preference_rows
from finetune.errors import UsageError
from finetune.eval import generate as G
from finetune.eval.metrics import PREFERENCE_METRICS
from finetune.eval.suites import Example, select_rows

Logps = tuple[float, int, float, int]  # chosen sum, chosen tokens, rejected sum, rejected tokens


def load_pairs(task, data_cfg) -> list[PrefExample]:
    """The task's held-out pairs (first or last n); a bad row is refused in one line."""
    if task.data_path is None:
        raise UsageError(f"task '{task.name}': format preference needs a file, got '{task.data}'")
    rows = read_preference_rows(task.data_path, system_prompt=data_cfg.system_prompt, what="eval data")
    pairs = [ex for ex in rows.examples if ex.paired]
    if not pairs:
        raise UsageError(f"task '{task.name}': {task.data_path} has no pairs (chosen and rejected); "
                         f"unpaired feedback cannot be scored as pairs")
    return select_rows(pairs, task)


def as_examples(pairs: list[PrefExample]) -> list[Example]:
    """The pairs as generation rows: the prompt, the chosen answer as the reference."""
    return [Example(messages=ex.prompt.chat(), answer=str(ex.chosen.get("content") or "")) for ex in pairs]


def pair_ids(tok, task, pairs: list[PrefExample], data_cfg) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids, as DPO trains on them (truncated to task.seq_len)."""
    renderer = get_renderer(tok, data_cfg)
    out = []
    for i, ex in enumerate(pairs):
        try:
            prompt, answers = encode_example(renderer, ex)
            prompt, answers, _ = fit_lengths(prompt, answers, task.seq_len)
        except BadRow as e:
            raise UsageError(f"task '{task.name}': pair {i + 1} of {task.data_path}: {e.reason}"
                             f"{': ' + e.detail if e.detail else ''}") from None
        out.append((prompt, answers[0], answers[1]))
    return out


def side_logprobs(model, tok, task, ids, show: bool = True) -> list[Logps]:
    """Summed log-prob and token count of the chosen and the rejected answer of every pair."""
    pairs = [(p, c) for p, c, _ in ids] + [(p, r) for p, _, r in ids]
    lps = G.pair_logprobs(model, tok, pairs, task.batch_size, show, desc=f"{task.name} pairs", unit="answers")
    n = len(ids)
    return [(lps[i][0], lps[i][1], lps[n + i][0], lps[n + i][1]) for i in range(n)]


def pref_scores(metrics, policy: list[Logps], reference: Optional[list[Logps]], beta: float) -> dict[str, float]:
    """The preference metrics asked for (module doc), over every pair."""
    n = len(policy)
    out: dict[str, float] = {}
    if "win_rate" in metrics:
        out["win_rate"] = 100.0 * sum(c / max(nc, 1) > r / max(nr, 1) for c, nc, r, nr in policy) / n
    if reference is not None:
        margins = [beta * ((c - rc) - (r - rr)) for (c, _, r, _), (rc, _, rr, _) in zip(policy, reference)]
        if "reward_accuracy" in metrics:
            out["reward_accuracy"] = 100.0 * sum(m > 0 for m in margins) / n
        if "reward_margin" in metrics:
            out["reward_margin"] = sum(margins) / n
    return {m: out[m] for m in metrics if m in out}


def needs_reference(task) -> bool:
    return any(m in ("reward_accuracy", "reward_margin") for m in task.metrics)


class PrefScoring:
    """Preference tasks across the checkpoints of one run: each checkpoint's log-probs while it is
    loaded, the reference's where they cost least (module doc), the scores at the end."""

    def __init__(self, tasks, run_base: Optional[str]):
        self.tasks = {t.name: t for t in tasks if t.format == "preference"}
        self.run_base = run_base
        self.ref_key: dict[str, str] = {}
        for t in self.tasks.values():
            if not needs_reference(t):
                continue
            if t.reference == "base":
                if run_base is None:
                    raise UsageError(f"task '{t.name}': reference base, but no base model is known: add base or an "
                                     f"adapter to models=, or set base_model= or recipe=")
                self.ref_key[t.name] = run_base
            else:
                self.ref_key[t.name] = str(Path(t.reference).expanduser().resolve())
        self.policy: dict[tuple[str, str], list[Logps]] = {}
        self.reference: dict[str, list[Logps]] = {}

    def observe(self, ck, model, tok, task, ids, records: list[dict], show: bool = True) -> None:
        """Score `task`'s pairs with the loaded checkpoint (and its base, when that is the reference)."""
        lps = side_logprobs(model, tok, task, ids, show)
        self.policy[(task.name, ck.name)] = lps
        for r, (c, nc, rj, nr) in zip(records, lps):
            r.update(chosen_logp=round(c, 4), chosen_tokens=nc, rejected_logp=round(rj, 4), rejected_tokens=nr)
        key = self.ref_key.get(task.name)
        if key is None or task.name in self.reference:
            return
        if ck.path == key:
            self.reference[task.name] = lps
        elif ck.kind == "adapter" and ck.base == key and hasattr(model, "disable_adapter"):
            with model.disable_adapter():  # the base, computed by the model in memory: no second load
                self.reference[task.name] = side_logprobs(model, tok, task, ids, show)

    def missing_references(self) -> dict[str, list[str]]:
        """{reference path or base: [tasks]} whose reference no column gave."""
        out: dict[str, list[str]] = {}
        for name, key in self.ref_key.items():
            if name not in self.reference:
                out.setdefault(key, []).append(name)
        return out

    def add_reference(self, task_name: str, model, tok, ids, show: bool = True) -> None:
        self.reference[task_name] = side_logprobs(model, tok, self.tasks[task_name], ids, show)

    def fill(self, scores: dict[str, dict[str, float]], names: list[str]) -> None:
        """Every checkpoint's preference scores, in place of the placeholders the loop left."""
        for task in self.tasks.values():
            metrics = [m for m in task.metrics if m in PREFERENCE_METRICS]
            for name in names:
                policy = self.policy.get((task.name, name))
                if policy is not None:
                    got = pref_scores(metrics, policy, self.reference.get(task.name), task.beta)
                    scores[name].update({f"{task.name}/{m}": v for m, v in got.items()})
