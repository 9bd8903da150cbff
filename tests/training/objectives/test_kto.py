"""KTO: desirable and undesirable examples against the reference, shifted by the KL estimate from
mismatched pairs (clamped at 0, no gradient), weighted per class; normalised by examples."""

import torch

from finetune.training.objectives.kto import KTO, kl_estimate, kto_loss


def test_formula():
    pol, ref = torch.tensor([-3.0, -5.0, -2.0]), torch.tensor([-4.0, -4.0, -2.5])
    label = torch.tensor([1.0, 0.0, 0.0])
    kl = torch.tensor(0.3)
    losses, rewards = kto_loss(pol, ref, label, kl, 0.5, desirable_weight=1.5, undesirable_weight=0.7)
    r = pol - ref
    want = torch.stack([1.5 * (1 - torch.sigmoid(0.5 * (r[0] - kl))),
                        0.7 * (1 - torch.sigmoid(0.5 * (kl - r[1]))), 0.7 * (1 - torch.sigmoid(0.5 * (kl - r[2])))])
    torch.testing.assert_close(losses, want)
    torch.testing.assert_close(rewards, 0.5 * r)


def test_kl_estimate_is_a_clamped_mean_without_gradient():
    p = torch.tensor([-1.0, -3.0], requires_grad=True)
    assert float(kl_estimate(p, torch.tensor([-2.0, -2.0]))) == 0.0  # mean 0 -> 0
    k = kl_estimate(p, torch.tensor([-3.0, -4.0]))
    assert float(k) == 1.5 and not k.requires_grad
    assert float(kl_estimate(p[:0], p[:0])) == 0.0
    assert not KTO.paired and KTO.uses_reference
