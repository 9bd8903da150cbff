"""DPO: with LoRA initialised to zero the policy is the reference, so the first loss is exactly
ln 2 and every reward 0 (at either CPU precision); the variants follow their formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from finetune.models.load import load_model
from finetune.training.objectives.dpo import DPO, dpo_loss
from finetune.training.objectives.preference import Logps
from pref_units import pairs
from tiny_peft import make_cfg


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_first_loss_is_ln2_and_rewards_are_zero(monkeypatch, precision):
    monkeypatch.setenv("FINETUNE_CPU_PRECISION", precision)
    cfg = make_cfg(**{"train.objective": "dpo", "lora.dropout": "0.05"})
    torch.manual_seed(0)
    model = load_model(cfg, "cpu", gradient_checkpointing=False)  # peft's init: LoRA B = 0
    model.train()
    obj = DPO(cfg)
    loss, n, metrics = obj.loss_module(model)(*obj.inputs(obj.collate(pairs(), 0)))
    assert int(n) == 4
    assert float(loss.detach()) / 4 == pytest.approx(math.log(2), abs=1e-6)
    # exactly: the log-ratios are 0 to the bit (B = 0 adds exactly nothing), so each pair's loss is
    # -log sigmoid(0) in fp32
    assert torch.equal(loss.detach(), 4 * -F.logsigmoid(torch.zeros(())))
    m = dict(zip(obj.metric_names, metrics.tolist()))
    assert m["rewards_chosen"] == 0 and m["rewards_rejected"] == 0 and m["reward_margin"] == 0
    assert m["reward_accuracy"] == 0  # a tie is not a win
    loss.backward()  # and the gradient reaches the adapter (B gets one through A)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n_, p in model.named_parameters() if "lora_B" in n_)


def logps(c, r, nc=(4.0, 5.0), nr=(2.0, 3.0)):
    return Logps(torch.tensor(c), torch.tensor(r), torch.tensor(nc), torch.tensor(nr))


def test_variants_follow_their_formulas():
    pol, ref = logps([-3.0, -7.0], [-6.0, -4.0]), logps([-4.0, -6.5], [-5.0, -5.0])
    b, eps = 0.5, 0.2
    d = torch.tensor([(-3 + 4) - (-6 + 5), (-7 + 6.5) - (-4 + 5)])
    z = b * d
    sig = dpo_loss(pol, ref, b, "sigmoid")
    torch.testing.assert_close(sig.losses, -F.logsigmoid(z))
    torch.testing.assert_close(sig.chosen_rewards, b * torch.tensor([1.0, -0.5]))
    torch.testing.assert_close(dpo_loss(pol, ref, b, "sigmoid", eps).losses,
                               -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z))
    torch.testing.assert_close(dpo_loss(pol, ref, b, "robust", eps).losses,
                               ((1 - eps) * -F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps))
    torch.testing.assert_close(dpo_loss(pol, ref, b, "hinge").losses, torch.relu(1 - z))
    dm = torch.tensor([1 / 4 - (-1) / 2, -0.5 / 5 - 1 / 3])
    torch.testing.assert_close(dpo_loss(pol, ref, b, "ipo").losses, (dm - 1 / (2 * b)) ** 2)
