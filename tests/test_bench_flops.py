"""bench/flops.py against a count by hand for a tiny Llama shape."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from flops import PROJECTIONS, Shape, causal_pairs, run_flops, step_flops  # noqa: E402

TINY = Shape(layers=2, hidden=4, intermediate=6, heads=2, kv_heads=1, head_dim=2, vocab=10)


def test_hand_count():
    # projections (in x out): q 4x4, k 4x2, v 4x2, o 4x4, gate 4x6, up 4x6, down 6x4: sum in*out = 120
    # 3 body tokens in two documents of 2 and 1 tokens (3 + 1 causal pairs), the head at 2 positions,
    # LoRA r=1 on q_proj and down_proj
    got = step_flops(TINY, 1, ["q_proj", "down_proj"], tokens=3, attn_pairs=causal_pairs([2, 1]), head_positions=2)
    assert got == {
        "frozen_fwd": 2 * 120 * 2 * 3,                      # 1440
        "frozen_bwd": (2 * 120 * 2 - 2 * (16 + 8 + 8)) * 3,  # input grads, none for layer 0's q/k/v: 1248
        "lora_fwd": (2 * (4 + 4) + 2 * (6 + 4)) * 2 * 3,    # 216
        # dB + d(low-rank) = 4*r*out, dA + dx = 4*r*in; layer 0's q_proj has no dx (2*r*in = 8)
        "lora_bwd": ((4 * 4 + 4 * 4 + 4 * 4 + 4 * 6) * 2 - 8) * 3,  # 408
        "attn_fwd": 4 * 2 * 2 * 2 * 4,                      # 4 * head_dim * heads * layers * pairs = 128
        "attn_bwd": 256,
        "head_fwd": 2 * 4 * 10 * 2,                         # 160
        "head_bwd": 160,
        "total": 4016,
    }


def test_from_config_and_sums():
    cfg = {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
           "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152}
    s = Shape.from_config(cfg)
    assert s.linears()["k_proj"] == (576, 192) and s.linears()["o_proj"] == (576, 576)
    assert Shape.from_config({**cfg, "head_dim": None}).head_dim == 64
    one = step_flops(s, 16, PROJECTIONS, 100, causal_pairs([60, 40]), 30)
    two = run_flops(s, 16, PROJECTIONS, [100, 100], [causal_pairs([60, 40])] * 2, [30, 30])
    assert two == {k: 2 * v for k, v in one.items()}
    # the body's frozen forward dominates a 135M model at short context: ~2 * 3 * params per token
    assert 0.2 < one["frozen_fwd"] / one["total"] < 0.5
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        step_flops(s, 16, ["qkv"], 1, 1, 1)


def test_documents_from_positions():
    from flops import doc_lengths, row_pairs
    import torch

    assert doc_lengths([0, 1, 2, 0, 1, 0]) == [3, 2, 1]
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [5, 6, 0, 0, 0, 0]])  # pad id 0
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 0, 0, 0, 0]])
    assert row_pairs(ids, 0, pos) == 6 + 3 + 3  # docs 3 and 2 in row 0, 2 in row 1
    assert row_pairs(ids, 0) == 15 + 3
