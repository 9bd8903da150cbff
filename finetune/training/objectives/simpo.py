"""SimPO (Meng et al. 2024, arXiv:2405.14734): a reference-free margin loss on length-normalised
log-probs; as TRL's CPOTrainer computes it with loss_type="simpo" and cpo_alpha=0.

With a_w, a_l the per-token average log-probs of chosen and rejected, beta = pref.beta,
gamma = pref.simpo_gamma, eps = pref.label_smoothing and z = beta (a_w - a_l) - gamma:
    loss = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)
Rewards: beta a_w and beta a_l. The paper's beta is around 2 to 2.5 (pref.beta's 0.1 default is DPO's).
"""

from __future__ import annotations

import torch.nn.functional as F

from finetune.training.objectives.preference import Logps, PairLoss, PreferenceObjective


def simpo_loss(policy: Logps, beta: float, gamma: float, label_smoothing: float = 0.0) -> PairLoss:
    a = policy.mean()
    z = beta * (a.chosen - a.rejected - gamma / beta)
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return PairLoss(losses, (beta * a.chosen).detach(), (beta * a.rejected).detach())


class SimPO(PreferenceObjective):
    name = "simpo"

    def pair_loss(self, policy: Logps, reference=None) -> PairLoss:
        p = self.cfg.pref
        return simpo_loss(policy, p.beta, p.simpo_gamma, p.label_smoothing)
