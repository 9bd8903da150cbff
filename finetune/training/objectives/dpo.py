"""DPO (Rafailov et al. 2023, arXiv:2305.18290) and its variants, as TRL's DPOTrainer defines them.

With the log-ratios of policy to reference, chosen c = log pi(y_w|x) - log pi_ref(y_w|x) and
rejected r likewise, d = c - r, beta = pref.beta, eps = pref.label_smoothing:
- sigmoid: -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)  (eps > 0: conservative DPO,
  Mitchell 2023; eps = 0: the paper's loss, and TRL's sigmoid)
- robust:  (-(1 - eps) log sigmoid(beta d) + eps log sigmoid(-beta d)) / (1 - 2 eps)  (Chowdhury et al. 2024)
- hinge:   max(0, 1 - beta d)  (SLiC, Zhao et al. 2023)
- ipo:     (d' - 1 / (2 beta))^2, d' the same difference of per-token average log-ratios (Azar et
  al. 2023; TRL's length normalisation, confirmed with the IPO authors)
Rewards: beta c and beta r. With the policy equal to the reference (LoRA B = 0 at the start)
every reward is 0 and the sigmoid loss is ln 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.training.objectives.preference import Logps, PairLoss, PreferenceObjective


def dpo_loss(policy: Logps, reference: Logps, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> PairLoss:
    chosen = policy.chosen - reference.chosen
    rejected = policy.rejected - reference.rejected
    eps = label_smoothing
    if loss_type == "ipo":
        d = chosen / policy.chosen_n.clamp(min=1) - rejected / policy.rejected_n.clamp(min=1)
        losses = (d - 1 / (2 * beta)) ** 2
    else:
        z = beta * (chosen - rejected)
        if loss_type == "sigmoid":
            losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        elif loss_type == "robust":
            losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
        elif loss_type == "hinge":
            losses = torch.relu(1 - z)
        else:
            raise ValueError(f"unknown DPO loss_type {loss_type!r}")
    return PairLoss(losses, (beta * chosen).detach(), (beta * rejected).detach())


class DPO(PreferenceObjective):
    name = "dpo"
    uses_reference = True

    def pair_loss(self, policy: Logps, reference: Logps) -> PairLoss:
        p = self.cfg.pref
        return dpo_loss(policy, reference, p.beta, p.loss_type, p.label_smoothing)
