"""Per-sequence response log-probs: the layout (one per row or packed), and sums that are the same
packed, unpacked, chunked or not, and equal to each sequence run alone."""

import pytest
import torch
import torch.nn.functional as F

from finetune.training.objectives.logprobs import response_logps, sequence_logps, sequence_rows
from tiny_peft import make_model


def seqs():
    gen = torch.Generator().manual_seed(0)
    r = lambda n: torch.randint(3, 259, (n,), generator=gen).tolist()  # noqa: E731
    return [(r(6), r(5)), (r(3), r(2)), (r(9), r(7)), (r(2), r(3)), (r(4), r(1))]


def alone(model, prompt, response) -> float:
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    lp = -F.cross_entropy(logits, ids[0, 1:], reduction="none")
    return float(lp[len(prompt) - 1:].sum())


def test_rows_one_per_sequence_and_packed():
    s = seqs()
    plain = sequence_rows(s, pad_id=0)
    assert plain["input_ids"].shape == (5, 16)
    assert plain["input_ids"][1, :5].tolist() == s[1][0] + s[1][1] and plain["input_ids"][1, 5:].eq(0).all()
    assert plain["seq_index"][1].tolist() == [-1, -1, -1, 1, 1] + [-1] * 11
    assert plain["position_ids"][1].tolist() == list(range(5)) + list(range(11))
    packed = sequence_rows(s, pad_id=0, pack=True)
    assert packed["input_ids"].shape[0] < 5 and packed["input_ids"].shape[1] == 16
    for i, (p, r) in enumerate(s):  # every sequence's counted tokens are its response, in order
        assert packed["input_ids"][packed["seq_index"] == i].tolist() == r
        assert int((packed["seq_index"] == i).sum()) == len(r)


def test_a_response_at_a_segment_start_is_not_counted():
    rows = sequence_rows([([], [5, 6, 7])], pad_id=0)
    assert rows["seq_index"].tolist() == [[-1, 0, 0]]


@pytest.mark.parametrize("chunk", [0, 4])
def test_sums_packed_equal_unpacked_equal_alone(chunk):
    model = make_model()
    model.eval()
    s = seqs()
    want = torch.tensor([alone(model, p, r) for p, r in s])
    with torch.no_grad():
        for pack in (False, True):
            sums, counts = response_logps(model, s, pad_id=0, pack=pack, chunk=chunk)
            assert counts.tolist() == [len(r) for _, r in s]
            torch.testing.assert_close(sums, want, atol=1e-5, rtol=1e-5)


def test_gradients_flow_to_the_adapter():
    model = make_model()
    rows = sequence_rows(seqs(), pad_id=0, pack=True)
    sums, _ = sequence_logps(model, rows["input_ids"], rows["position_ids"], rows["seq_index"], 5, chunk=4)
    (sums * torch.arange(5.0)).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)
