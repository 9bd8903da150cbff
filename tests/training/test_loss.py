"""Speed features give the same loss and LoRA gradients as the plain path (CPU, tiny model, fp32).

Covered: the chunked lm_head + cross-entropy (train.loss_chunk_size), activation offload
(train.offload_activations), packing (the per-token loss sum over the same examples is the same
packed or not: nothing leaks across examples) and sdpa vs eager attention under packing.
"""

import pytest
import torch

from finetune.data.pack import collate, pack, single_units
from finetune.training.objectives.sft import CausalLMLoss
from tiny_peft import make_model

TOL = dict(atol=1e-5, rtol=1e-5)


def make_examples(n=5, seed=0):
    """Byte-level examples of different lengths; the first part of each is an untrained prompt."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length = 9 + 7 * i
        ids = torch.randint(3, 259, (length,), generator=gen).tolist()
        prompt = length // 3
        examples.append((ids, [-100] * prompt + ids[prompt:]))
    return examples


def loss_and_grads(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    loss, n = CausalLMLoss(model, **kw)(batch["input_ids"], batch["labels"], batch["position_ids"])
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach(), int(n), grads


def assert_same(a, b):
    loss_a, n_a, grads_a = a
    loss_b, n_b, grads_b = b
    assert n_a == n_b
    torch.testing.assert_close(loss_a, loss_b, **TOL)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], **TOL, msg=k)


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def packed_batch():
    return collate(pack(make_examples(), 64), pad_id=0)


@pytest.mark.parametrize("chunk", [5, 7, 16, 4096])
def test_chunked_loss_equals_plain_loss(model, packed_batch, chunk):
    n_trained = int((packed_batch["labels"][:, 1:] != -100).sum())
    assert chunk > n_trained or n_trained % chunk, "want chunk sizes that do not divide the trained tokens"
    assert_same(loss_and_grads(model, packed_batch, chunk=0), loss_and_grads(model, packed_batch, chunk=chunk))


def test_chunked_loss_skips_untrained_positions(model, packed_batch):
    # The head runs on trained positions only: fewer rows through lm_head than sequence positions.
    rows = []
    head = model.get_base_model().get_output_embeddings()
    handle = head.register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[0]))
    try:
        loss_and_grads(model, packed_batch, chunk=7)
    finally:
        handle.remove()
    n_trained = int((packed_batch["labels"][:, 1:] != -100).sum())
    forward_rows = sum(rows) // 2  # each chunk runs once in forward and once more in backward
    assert forward_rows == n_trained < packed_batch["input_ids"].numel()


@pytest.mark.parametrize("chunk", [0, 7])
def test_offload_activations_parity(model, packed_batch, chunk):
    assert_same(loss_and_grads(model, packed_batch, chunk=chunk),
                loss_and_grads(model, packed_batch, chunk=chunk, offload=True))


@pytest.mark.parametrize("chunk", [0, 7])
def test_packing_gives_the_same_token_loss_sum(model, chunk):
    # Attention must not cross examples inside a pack; if it did, per-token losses would change.
    examples = make_examples()
    packed = collate(pack(examples, 64), pad_id=0)
    assert packed["input_ids"].shape[0] < len(examples)  # really packed, several examples per row
    unpacked = collate(single_units(examples), pad_id=0)
    assert_same(loss_and_grads(model, unpacked, chunk=chunk), loss_and_grads(model, packed, chunk=chunk))


def test_sdpa_and_eager_agree_under_packing(packed_batch):
    sdpa = loss_and_grads(make_model(**{"model.attn_implementation": "sdpa"}), packed_batch, chunk=7)
    eager = loss_and_grads(make_model(**{"model.attn_implementation": "eager"}), packed_batch, chunk=7)
    loss_s, n_s, grads_s = sdpa
    loss_e, n_e, grads_e = eager
    assert n_s == n_e
    torch.testing.assert_close(loss_s, loss_e, atol=1e-4, rtol=1e-5)
    for k in grads_s:
        torch.testing.assert_close(grads_s[k], grads_e[k], atol=1e-4, rtol=1e-4, msg=k)
