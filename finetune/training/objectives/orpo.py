"""ORPO (Hong et al. 2024, arXiv:2403.07691): supervised loss on the chosen response plus lambda
times the odds-ratio term, no reference model; as TRL's ORPOTrainer computes the odds ratio.

With a_w, a_l the per-token average log-probs of chosen and rejected (log odds(y) = a - log(1 - e^a)),
lambda = pref.beta:
    loss = -a_w - lambda log sigmoid(log odds(y_w) - log odds(y_l))
The supervised term is the chosen response's per-token NLL (the paper's L_SFT, on the tokens
that count; TRL also counts the prompt's tokens there). Rewards: lambda a_w and lambda a_l.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.training.objectives.preference import Logps, PairLoss, PreferenceObjective


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, without cancellation (branch at -ln 2)."""
    x = x.clamp(max=-1e-6)  # an average log-prob of exactly 0 would make the odds infinite
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(policy: Logps, lam: float) -> PairLoss:
    a = policy.mean()
    log_odds = (a.chosen - a.rejected) - (log1mexp(a.chosen) - log1mexp(a.rejected))
    losses = -a.chosen - lam * F.logsigmoid(log_odds)
    return PairLoss(losses, (lam * a.chosen).detach(), (lam * a.rejected).detach())


class ORPO(PreferenceObjective):
    name = "orpo"

    def pair_loss(self, policy: Logps, reference=None) -> PairLoss:
        return orpo_loss(policy, self.cfg.pref.beta)
