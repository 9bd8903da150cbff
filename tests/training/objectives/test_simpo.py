"""SimPO: a margin loss on per-token average log-probs, target margin gamma; no reference."""

import torch
import torch.nn.functional as F

from finetune.training.objectives.preference import Logps
from finetune.training.objectives.simpo import SimPO, simpo_loss


def test_formula():
    pol = Logps(torch.tensor([-4.0, -9.0]), torch.tensor([-6.0, -2.0]), torch.tensor([4.0, 3.0]), torch.tensor([2.0, 4.0]))
    b, g, eps = 2.0, 0.5, 0.1
    z = b * torch.tensor([-1.0 - -3.0, -3.0 - -0.5]) - g
    out = simpo_loss(pol, b, g, eps)
    torch.testing.assert_close(out.losses, -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([-2.0, -6.0]))
    assert not SimPO.uses_reference
