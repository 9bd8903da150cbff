"""KTO (Ethayarajh et al. 2024, arXiv:2402.01306): unpaired feedback (a completion and whether it
is desirable), against the reference policy; as TRL's KTOTrainer (loss_type="kto") computes it.

With r = log pi(y|x) - log pi_ref(y|x), beta = pref.beta and z_ref the KL estimate
max(0, mean over the micro-batch of the mismatched pairs' policy-minus-reference log-ratio),
taken without gradient:
    desirable:   desirable_weight   * (1 - sigmoid(beta (r - z_ref)))
    undesirable: undesirable_weight * (1 - sigmoid(beta (z_ref - r)))
summed over examples and divided by the step's examples. The mismatched pairs are prompt i with
the completion of example i-1 in the same micro-batch (TRL's choice), so a micro-batch of one
example has no KL estimate (z_ref = 0): preflight refuses train.micro_batch_size=1 for kto.
Rewards: beta r, logged as the mean over desirable (rewards_chosen) and undesirable
(rewards_rejected) examples, with the KL estimate as `kl`.
"""

from __future__ import annotations

import torch
from torch import nn

from finetune.errors import UsageError
from finetune.training.loss import head_chunk, offloaded
from finetune.training.objectives.preference import PairLossModule, PreferenceObjective, add_reference_adapter


def kto_loss(policy: torch.Tensor, reference: torch.Tensor, label: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """(per-example losses, rewards) for completion log-prob sums `policy` / `reference`."""
    r = policy - reference
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - r)))
    return torch.where(label > 0, good, bad), (beta * r).detach()


def kl_estimate(policy_kl: torch.Tensor, reference_kl: torch.Tensor) -> torch.Tensor:
    if not len(policy_kl):
        return policy_kl.new_zeros(())
    return (policy_kl - reference_kl).mean().detach().clamp(min=0)


class KTO(PreferenceObjective):
    name = "kto"
    paired = False
    uses_reference = True
    batch_keys = ("input_ids", "position_ids", "seq_index", "weight", "label")
    normaliser = "examples"
    metric_names = ("rewards_chosen", "rewards_rejected", "logps_chosen", "logps_rejected", "kl")

    def check(self) -> None:
        super().check()
        if self.cfg.train.micro_batch_size == 1:
            raise UsageError("train.objective=kto estimates its KL term from the other examples of a micro-batch; "
                             "train.micro_batch_size=1 has none: use 2 or more")

    def loss_module(self, model: nn.Module) -> nn.Module:
        t = self.cfg.train
        add_reference_adapter(model, self)  # model.adapter: that adapter, frozen, is the reference (as dpo)
        return KTOLossModule(model, self, chunk=head_chunk(t, model), offload=t.offload_activations)

    def step_metrics(self, outputs: list[tuple]) -> dict[str, torch.Tensor]:
        """(sum, count) per metric: rewards and log-probs are means over the desirable or the
        undesirable examples alone, kl a mean over micro-batches."""
        total = sum(o[2] for o in outputs)
        return {name: total[i] for i, name in enumerate(self.metric_names)}


class KTOLossModule(PairLossModule):
    """forward(input_ids, position_ids, seq_index, weight, label) -> (sum of the examples' losses,
    examples, [metric, 2] (sum, count) rows)."""

    def forward(self, input_ids, position_ids, seq_index, weight, label):
        n = weight.shape[0]
        n_seqs = 2 * n if n >= 2 else n
        ref, _ = self.reference_logps(input_ids, position_ids, seq_index, n_seqs)
        with offloaded(self.offload, pin_memory=input_ids.is_cuda):
            pol, _ = self.logps(input_ids, position_ids, seq_index, n_seqs)
        kl = kl_estimate(pol[n:].detach(), ref[n:])
        p = self.objective.cfg.pref
        losses, rewards = kto_loss(pol[:n], ref[:n], label, kl, p.beta, p.desirable_weight, p.undesirable_weight)
        good, bad = weight * (label > 0), weight * (label <= 0)
        lp = pol[:n].detach()
        metrics = torch.stack([
            torch.stack([(good * rewards).sum(), good.sum()]), torch.stack([(bad * rewards).sum(), bad.sum()]),
            torch.stack([(good * lp).sum(), good.sum()]), torch.stack([(bad * lp).sum(), bad.sum()]),
            torch.stack([kl.float(), torch.ones((), device=kl.device)]),
        ])
        return (weight * losses).sum(), (weight > 0).sum(), metrics

