"""Parity with lm-evaluation-harness: the same multiple-choice questions and plain texts through our
native plain-text path and through lm-eval's HFLM, on the tiny model. Equal answers, per-option
and per-text log-likelihoods within 1e-3, and the same acc / acc_norm / perplexities. Skips where
lm-eval is not installed (the `lm-eval` extra)."""

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval")

QUESTIONS = [
    ("Which is a fruit?", ["apple", "chair", "river"], 0),
    ("Which is a color?", ["seven", "green", "table"], 1),
    ("Which is a number?", ["cat", "blue", "three"], 2),
    ("Which one can fly?", ["a bird", "a stone", "a shoe"], 0),
    ("Which is hot?", ["ice", "snow", "fire"], 2),
]
TEXTS = ["The cat sat on the mat. It was a warm afternoon.",
         "Paris is the capital of France, and Berlin is the capital of Germany.",
         "Two plus two is four; three times three is nine.  Spaces   and\ttabs\ncount as word breaks."]

MC_TASK = """task: parity_mc
dataset_path: json
dataset_kwargs: {data_files: {test: "MC"}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
"""
TEXT_TASK = """task: parity_text
dataset_path: json
dataset_kwargs: {data_files: {test: "TEXTS"}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity}
  - {metric: byte_perplexity}
  - {metric: bits_per_byte}
"""


def _write(tmp_path):
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                         for q, c, a in QUESTIONS))
    (lm / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    # Absolute: lm-eval reads data_files relative to the working directory.
    (lm / "parity_mc.yaml").write_text(MC_TASK.replace("MC", str(lm / "mc.jsonl")))
    (lm / "parity_text.yaml").write_text(TEXT_TASK.replace("TEXTS", str(lm / "texts.jsonl")))
    # The same documents as our own eval rows: the prompt lm-eval's doc_to_text renders, as it is.
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps({"prompt": f"Question: {q}\nAnswer:", "choices": c,
                                                           "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    suite = tmp_path / "parity.yaml"
    suite.write_text(
        "name: parity\nprompt: plain\ntasks:\n"
        "  - {name: mc, data: mc.jsonl, metrics: [acc, acc_norm], batch_size: 4}\n"
        "  - {name: text, data: texts.jsonl, metrics: [word_perplexity, byte_perplexity, bits_per_byte]}\n"
        "  - {name: mc-lm, lm_eval: lm/parity_mc.yaml}\n"
        "  - {name: text-lm, lm_eval: lm/parity_text.yaml}\n")
    return lm, suite


def _lm_eval_samples(model, tok, lm_dir):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu"),
                                  tasks=["parity_mc", "parity_text"], log_samples=True, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(lm_dir), include_defaults=False),
                                  verbosity="ERROR")

    def ll(resp):  # (loglikelihood, is_greedy) for a choice, a bare float for a rolling text
        while isinstance(resp, (list, tuple)):
            resp = resp[0]
        return float(resp)

    by_doc = lambda name: sorted(out["samples"][name], key=lambda s: s["doc_id"])
    mc = [[ll(r) for r in s["filtered_resps"]] for s in by_doc("parity_mc")]
    texts = [ll(s["filtered_resps"]) for s in by_doc("parity_text")]
    return mc, texts


@pytest.mark.slow
def test_native_plain_mode_matches_lm_eval(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.eval import evaluate
    from finetune.eval import loglik as L
    from finetune.eval.prompting import load_examples, task_data_config
    from finetune.eval.suites import load_suite

    lm_dir, suite_path = _write(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_model))

    # Per option and per text, the log-likelihoods themselves.
    want_mc, want_texts = _lm_eval_samples(model, tok, lm_dir)
    suite = load_suite(str(suite_path))
    mc_task, text_task = suite.tasks[0], suite.tasks[1]
    mc_rows = load_examples(mc_task, task_data_config(mc_task))
    got_mc = L.choice_loglikelihoods(model, tok, mc_task, mc_rows, None, show=False)
    for got, want in zip(got_mc, want_mc):
        assert got == pytest.approx(want, abs=1e-3)
        assert max(range(len(got)), key=got.__getitem__) == max(range(len(want)), key=want.__getitem__)
    got_texts = L.rolling_loglikelihoods(model, tok, TEXTS, batch_size=2, show=False)
    assert got_texts == pytest.approx(want_texts, abs=1e-3)

    # And the scorecard: native and bridge tasks side by side, each naming its convention.
    card = evaluate(str(suite_path), [str(tiny_model)], tmp_path / "ev", device="cpu", show=False)
    s = card["scores"][card["models"][0]["name"]]
    assert s["mc/acc"] == pytest.approx(s["mc-lm/acc"]) and s["mc/acc_norm"] == pytest.approx(s["mc-lm/acc_norm"])
    for m in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert math.isclose(s[f"text/{m}"], s[f"text-lm/{m}"], rel_tol=1e-4), m
    conv = {t: info["convention"] for t, info in card["tasks"].items()}
    assert conv["mc"]["prompt"] == conv["mc-lm"]["prompt"] == "plain"
    assert conv["mc-lm"]["harness"] == "lm-evaluation-harness" and conv["mc-lm"]["num_fewshot"] == 0
