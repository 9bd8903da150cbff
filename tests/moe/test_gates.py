"""Hidden-mode gates from chat-formatted prompts separate experts; zero and parallel rows warn."""

import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.models.tiny_spec import BYTE_OFFSET
from finetune.moe.gates import compute_gates, own_positions, prompt_ids, warn_gates, zero_rows


@pytest.fixture(scope="module")
def base(tiny_model):
    return (AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(tiny_model))


def expert(pos, neg=()):
    return SimpleNamespace(positive_prompts=list(pos), negative_prompts=list(neg))


def gates(base, experts, fmt):
    model, tok = base
    return compute_gates("hidden", experts, model.config.num_hidden_layers, model.config.hidden_size,
                         model=model, tokenizer=tok, prompt_format=fmt)


def test_chat_positions_are_the_prompts_own_tokens(base):
    _, tok = base
    ids = prompt_ids(tok, "abc", "chat")
    pos = own_positions(tok, "abc", "chat", len(ids))
    assert [ids[i] for i in pos] == [BYTE_OFFSET + ord(c) for c in "abc"]
    assert pos[-1] < len(ids) - 1  # the template's "assistant\n" comes after them
    assert own_positions(tok, "abc", "raw", 4) == [3]  # mergekit's last token


def test_chat_layer0_gate_is_the_mean_embedding_of_the_prompt_tokens(base):
    model, tok = base
    emb = model.model.embed_tokens.weight.detach()
    g = gates(base, [expert(["abc", "hello"], ["xyz"]), expert(["xyz"], ["abc"])], "chat")
    assert (g.norm(dim=-1) > 0.99).all()  # every layer, both experts: no zero rows

    def own_mean(p):
        return emb[[BYTE_OFFSET + ord(c) for c in p]].mean(0)

    v = (own_mean("abc") + own_mean("hello")) / 2 - own_mean("xyz")
    assert torch.allclose(g[0, 0], v / v.norm(), atol=1e-5)


def test_chat_prompts_ending_alike_gave_zero_layer0_rows_with_last_token(base, caplog):
    # The bug of issue 17: with the last token, every chat prompt ends in the same template token.
    model, tok = base
    ids_last = [prompt_ids(tok, p, "chat")[-1] for p in ("abc", "xyz")]
    assert ids_last[0] == ids_last[1]
    # raw prompts that end in the same character reproduce it in layer 0 and now warn
    g = gates(base, [expert(["ab!"], ["cd!"]), expert(["cd!"], ["ab!"])], "raw")
    assert torch.equal(g[0], torch.zeros_like(g[0])) and (g[1].norm(dim=-1) > 0.99).all()
    assert zero_rows(g) == [(0, [0]), (1, [0])]
    with caplog.at_level(logging.WARNING):
        msgs = warn_gates(g, ["A", "B"])
    assert len(msgs) == 2 and "expert 0 (A) has a zero gate row in layers [0]" in msgs[0]
    assert "zero gate row" in caplog.text


def test_warn_gates_parallel_and_zero():
    g = torch.zeros(3, 3, 4)
    g[:, 0, 0] = 1.0
    g[:, 1, 0], g[:, 1, 1] = 1.0, 0.05  # nearly parallel to expert 0 everywhere
    g[1:, 2, 2] = 1.0  # expert 2: zero in layer 0 only
    msgs = warn_gates(g, ["a", "b", "c"])
    assert "experts 0 (a) and 1 (b) have nearly parallel gate rows in all layers" in msgs[0]
    assert "expert 2 (c) has a zero gate row in layers [0]" in msgs[1] and len(msgs) == 2


def _mode(base, experts, mode, fmt="raw"):
    model, tok = base
    return compute_gates(mode, experts, model.config.num_hidden_layers, model.config.hidden_size,
                         model=model, tokenizer=tok, prompt_format=fmt)


def test_mergekit_hidden_mode_names(base):
    """hidden_last and hidden_avg, as mergekit names them: last gate position or the mean of all."""
    model, tok = base
    emb = model.model.embed_tokens.weight.detach()
    experts = [expert(["abc", "hello"], ["xyz"]), expert(["xyz"], ["abc"])]
    assert torch.equal(_mode(base, experts, "hidden_last"), _mode(base, experts, "hidden"))  # raw: mergekit's hidden
    assert torch.equal(_mode(base, experts, "hidden_avg", "chat"), _mode(base, experts, "hidden", "chat"))

    def mean_emb(p, fmt="raw", last=False):
        ids = prompt_ids(tok, p, fmt)
        pos = own_positions(tok, p, fmt, len(ids), "hidden_last" if last else "hidden_avg")
        return emb[[ids[i] for i in pos]].mean(0)

    avg = _mode(base, experts, "hidden_avg")
    v = (mean_emb("abc") + mean_emb("hello")) / 2 - mean_emb("xyz")  # every token of each raw prompt
    assert torch.allclose(avg[0, 0], v / v.norm(), atol=1e-5)
    last_chat = _mode(base, experts, "hidden_last", "chat")
    w = (emb[BYTE_OFFSET + ord("c")] + emb[BYTE_OFFSET + ord("o")]) / 2 - emb[BYTE_OFFSET + ord("z")]
    assert torch.allclose(last_chat[0, 0], w / w.norm(), atol=1e-5)  # the prompt's own last character
    assert own_positions(tok, "abc", "raw", 4, "hidden_avg") == [0, 1, 2, 3]


@pytest.mark.parametrize("mode", ["hidden_avg", "hidden_last"])
def test_spec_accepts_mergekit_gate_modes(tiny_model, mode):
    from finetune.moe.spec import parse_moe_config

    spec = parse_moe_config({"base_model": str(tiny_model), "gate_mode": mode,
                             "experts": [{"source_model": str(tiny_model), "positive_prompts": "a"}] * 2})
    assert spec.gate_mode == mode
    from finetune.errors import UsageError

    with pytest.raises(UsageError, match=f"experts\\[0\\] .* has no positive_prompts, which gate_mode {mode} needs"):
        parse_moe_config({"base_model": str(tiny_model), "gate_mode": mode,
                          "experts": [{"source_model": str(tiny_model)}] * 2})
