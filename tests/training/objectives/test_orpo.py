"""ORPO: the chosen response's per-token NLL minus lambda log sigmoid of the log odds ratio of the
per-token average log-probs; no reference."""

import math

import torch

from finetune.training.objectives.orpo import ORPO, log1mexp, orpo_loss
from finetune.training.objectives.preference import Logps


def test_formula():
    pol = Logps(torch.tensor([-4.0, -1.0]), torch.tensor([-6.0, -0.5]), torch.tensor([4.0, 2.0]), torch.tensor([3.0, 1.0]))
    out = orpo_loss(pol, 0.25)
    for i, (aw, al) in enumerate([(-1.0, -2.0), (-0.5, -0.5)]):
        odds = lambda a: a - math.log(1 - math.exp(a))  # noqa: E731
        want = -aw - 0.25 * math.log(1 / (1 + math.exp(-(odds(aw) - odds(al)))))
        assert abs(float(out.losses[i]) - want) < 1e-6
    assert out.chosen_rewards.tolist() == [-0.25, -0.125]
    assert not ORPO.uses_reference


def test_log1mexp_is_finite_near_zero_and_exact_elsewhere():
    x = torch.tensor([-20.0, -1.0, -0.1, -1e-9, 0.0])
    y = log1mexp(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:3], torch.log(1 - torch.exp(x[:3])))
