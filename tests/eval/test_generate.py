"""Batched, left-padded greedy generation gives exactly the tokens of one-at-a-time generation."""

import pytest
import torch

from finetune.eval.generate import choice_logprobs, generate, sequence_nll
from finetune.eval.suites import GenerationSpec


@pytest.fixture(scope="module")
def model_tok(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval(), \
        AutoTokenizer.from_pretrained(str(tiny_model))


def _prompts(tok):
    texts = ["Hi", "What is the capital of France?", "abc def", "A much longer prompt with several words in it."]
    return [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                    return_dict=False) for t in texts]


def test_batched_left_padded_equals_unbatched(model_tok):
    model, tok = model_tok
    prompts = [list(p) for p in _prompts(tok)]
    batched = generate(model, tok, prompts, GenerationSpec(max_new_tokens=12, batch_size=4), show=False)
    single = generate(model, tok, prompts, GenerationSpec(max_new_tokens=12, batch_size=1), show=False)
    assert batched == single
    assert any(batched)  # the random model does produce text


def test_sequence_nll_batched_equals_single_and_counts_labels(model_tok):
    model, tok = model_tok
    seqs = [([5, 6, 7, 8, 9], [-100, -100, 7, 8, 9]), ([10, 11, 12], [-100, 11, 12])]
    both = sequence_nll(model, seqs, pad_id=0, batch_size=2, show=False)
    one = [sequence_nll(model, [s], pad_id=0, batch_size=1, show=False)[0] for s in seqs]
    assert [c for _, c in both] == [3, 2]
    for (a, _), (b, _) in zip(both, one):
        assert a == pytest.approx(b, rel=1e-5)
    # By hand for the second sequence: -log p(11|10) - log p(12|10,11).
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([[10, 11, 12]])).logits[0].float(), -1)
    assert both[1][0] == pytest.approx(float(-(logp[0, 11] + logp[1, 12])), rel=1e-5)


def test_choice_logprobs_score_option_tokens_only(model_tok):
    model, tok = model_tok
    p = [list(_prompts(tok)[0])]
    lp = choice_logprobs(model, tok, p, [["a", "bc"]], show=False)[0]
    with torch.no_grad():
        logits = model(torch.tensor([p[0] + tok.encode("bc", add_special_tokens=False)])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    n = len(p[0])
    want = float(logp[n - 1, ord("b") + 3] + logp[n, ord("c") + 3])
    assert lp[1] == pytest.approx(want, rel=1e-5)
