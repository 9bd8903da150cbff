"""SFT as an objective: its data are `prepare`'s units, its batches `collate`'s, its loss the causal-LM
cross-entropy over trained tokens (chunked head, offload and router term from the recipe), its
normaliser the trained-token count; a blank unit is worth nothing; its synthetic batch is packed
like the recipe's data."""

import torch

from finetune.config import load_config
from finetune.data.pack import collate, pack
from finetune.data.pipeline import prepare
from finetune.models.load import load_tokenizer
from finetune.training.objectives import objective_for
from finetune.training.objectives.sft import SFT, CausalLMLoss, synthetic_batch
from tiny_peft import make_cfg, make_model


def examples():
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(4):
        ids = torch.randint(3, 259, (8 + 5 * i,), generator=gen).tolist()
        out.append((ids, [-100] * (len(ids) // 3) + ids[len(ids) // 3:]))
    return out


def test_synthetic_batch_packs_two_examples_per_row():
    b = synthetic_batch(100, 2, 10)
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]] * 2
    assert (b["labels"] == b["input_ids"]).all() and (b["input_ids"] > 0).all()


def test_synthetic_batch_follows_the_recipe_packing_and_seed():
    packed, unpacked = SFT(make_cfg()), SFT(make_cfg(**{"data.packing": "false", "train.seed": 7}))
    assert torch.equal(packed.synthetic_batch(100, 2, 10)["input_ids"], synthetic_batch(100, 2, 10, seed=42)["input_ids"])
    assert packed.synthetic_batch(100, 2, 10)["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]] * 2
    b = unpacked.synthetic_batch(100, 2, 10)
    assert b["position_ids"].tolist() == [list(range(10))] * 2
    assert torch.equal(b["input_ids"], synthetic_batch(100, 2, 10, seed=7)["input_ids"])
    assert unpacked.trained_tokens(b) == 2 * 9  # every position but the first predicts a token


def test_prepare_is_the_data_pipeline():
    cfg = load_config("tiny-lora", {"output.progress": "false"})
    tokenizer = load_tokenizer(cfg.model)
    ours = SFT(cfg).prepare(tokenizer, progress=False)
    theirs = prepare(cfg.data, tokenizer, seed=cfg.train.seed, progress=False)
    assert ours.train == theirs.train and ours.val == theirs.val


def test_batches_and_trained_tokens():
    sft = SFT(make_cfg())
    units = pack(examples(), 32)
    batch = sft.collate(units, pad_id=0)
    assert all(torch.equal(batch[k], collate(units, 0)[k]) for k in batch)
    assert list(sft.inputs(batch)) == [batch["input_ids"], batch["labels"], batch["position_ids"]]
    assert sft.trained_tokens(batch) == int((batch["labels"][:, 1:] != -100).sum()) > 0


def test_loss_module_is_the_recipe_causal_lm_loss_and_a_blank_unit_is_worth_nothing():
    model = make_model()
    moe = SFT(make_cfg(**{"train.router_aux_loss_coef": "0.01"})).loss_module(model)
    assert moe.router_aux_coef == 0.01  # the router term itself: tests/moe/test_routing.py
    sft = SFT(make_cfg(**{"train.loss_chunk_size": "7", "train.offload_activations": "true"}))
    lossmod = sft.loss_module(model)
    assert isinstance(lossmod, CausalLMLoss) and lossmod.model is model  # checkpoints name params through .model
    assert (lossmod.chunk, lossmod.offload, lossmod.router_aux_coef) == (7, True, 0.0)

    units = pack(examples(), 32)
    batch = sft.collate(units, pad_id=0)
    loss, n = lossmod(*sft.inputs(batch))
    assert int(n) == sft.trained_tokens(batch) and loss > 0

    blank = sft.collate([sft.blank(units[0])], pad_id=0)
    assert torch.equal(blank["input_ids"], sft.collate([units[0]], pad_id=0)["input_ids"])
    assert sft.trained_tokens(blank) == 0
    with torch.no_grad():
        loss, n = CausalLMLoss(model, chunk=7)(*sft.inputs(blank))
    assert float(loss) == 0 and int(n) == 0


def test_a_trained_head_takes_the_plain_loss():
    # The chunked head runs outside the model's own forward, where DDP would not sync a trained head.
    model = make_model(**{"lora.modules_to_save": "[lm_head]"})
    assert SFT(make_cfg(**{"train.loss_chunk_size": "7"})).loss_module(model).chunk == 0


def test_a_run_picks_sft():
    assert type(objective_for(make_cfg())) is SFT and SFT.name == "sft"
    assert "train.router_aux_loss_coef" in SFT.defining
