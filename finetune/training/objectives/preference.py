"""What the preference objectives (dpo, orpo, simpo, kto) share: their data, batches, reference
policy, loss module and step metrics. Each objective's own module adds only its loss formula.

Data: finetune.data.preference's units (prompt rendered once, responses = the tokens that count).
Paired units {"prompt_ids", "chosen_ids", "rejected_ids"}; unpaired (KTO) units
{"prompt_ids", "completion_ids", "label"}.

Batches: a micro-batch of n pairs is ONE forward of 2n sequences (prompt + chosen for each pair,
then prompt + rejected), laid out by finetune.training.objectives.logprobs.sequence_rows: with
data.packing, several short sequences share a row (position ids restarting) wherever that needs
fewer rows; the per-sequence sums are the same either way. KTO adds, for n >= 2, n mismatched
sequences (prompt i with the completion of example i-1, TRL's choice) whose policy-minus-reference
log-ratio, under no_grad, estimates the KL term.

The step is normalised by pairs (KTO: examples): `weight` is 1 per real pair and 0 for the blank
ones validation pads ranks with, and the loop divides the summed loss by the step's total weight.

Reference (dpo, kto): the same model with its adapter disabled (peft's disable_adapter: no second
model), or, when the run continues from an adapter (model.adapter), that adapter loaded frozen
as the peft adapter named "reference". It runs first, under no_grad.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar, NamedTuple, Optional, Sequence

import torch
from torch import nn

from finetune.errors import UsageError
from finetune.training.loss import head_chunk, offloaded
from finetune.training.objectives.base import Objective
from finetune.training.objectives.logprobs import sequence_logps, sequence_rows

REFERENCE_ADAPTER = "reference"


class Logps(NamedTuple):
    """Per-pair fp32 log-prob sums and token counts of the chosen and rejected responses."""
    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_n: torch.Tensor
    rejected_n: torch.Tensor

    def mean(self) -> "Logps":
        """Length-normalised (per-token average) log-probs, as SimPO, ORPO and IPO use them."""
        return Logps(self.chosen / self.chosen_n.clamp(min=1), self.rejected / self.rejected_n.clamp(min=1),
                     self.chosen_n, self.rejected_n)


class PairLoss(NamedTuple):
    """An objective's loss on n pairs: per-pair losses and rewards (rewards detached)."""
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


# --------------------------------------------------------------------------- units and batches


class PreferenceUnits(Sequence):
    """Preference units with their lengths (the longer side of a pair), so the batch stream can
    group similar lengths when data.packing is off, as it does for SFT's units."""

    def __init__(self, units: Sequence[dict]):
        self.units = units
        self._lengths = [unit_length(u) for u in units]

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, i):
        return self.units[i]

    def lengths(self) -> list[int]:
        return self._lengths

    def __eq__(self, other) -> bool:
        return list(self) == list(other)


def unit_length(u: dict) -> int:
    if "completion_ids" in u:
        return len(u["prompt_ids"]) + len(u["completion_ids"])
    return len(u["prompt_ids"]) + max(len(u["chosen_ids"]), len(u["rejected_ids"]))


def paired_collate(units: Sequence[dict], pad_id: int, pack: bool) -> dict[str, torch.Tensor]:
    """n pairs -> one forward's rows: sequences 0..n-1 are prompt + chosen, n..2n-1 prompt + rejected."""
    seqs = [(u["prompt_ids"], u["chosen_ids"]) for u in units] + [(u["prompt_ids"], u["rejected_ids"]) for u in units]
    batch = sequence_rows(seqs, pad_id, pack=pack)
    batch["weight"] = torch.tensor([0.0 if u.get("blank") else 1.0 for u in units])
    return batch


def unpaired_collate(units: Sequence[dict], pad_id: int, pack: bool) -> dict[str, torch.Tensor]:
    """n examples -> sequences 0..n-1 (prompt + completion) and, for n >= 2, n..2n-1: prompt i with
    completion i-1 (the mismatched pairs the KL estimate is taken on)."""
    seqs = [(u["prompt_ids"], u["completion_ids"]) for u in units]
    n = len(units)
    if n >= 2:
        seqs += [(units[i]["prompt_ids"], units[i - 1]["completion_ids"]) for i in range(n)]
    batch = sequence_rows(seqs, pad_id, pack=pack)
    batch["weight"] = torch.tensor([0.0 if u.get("blank") else 1.0 for u in units])
    batch["label"] = torch.tensor([1.0 if u["label"] else 0.0 for u in units])
    return batch


def synthetic_pairs(vocab: int, micro_batch: int, seq_len: int, seed: int = 0) -> list[dict]:
    """micro_batch random pairs of about seq_len tokens each side (prompt the first half): the shape
    of a full-length training micro-batch."""
    g = torch.Generator().manual_seed(seed)
    half = seq_len // 2
    ids = lambda n: torch.randint(1, vocab, (n,), generator=g).tolist()  # noqa: E731
    # The rejected side one token shorter: its padding restarts position ids, so attention takes
    # the masked path every real batch takes (some sequence is shorter than the longest).
    return [{"prompt_ids": ids(half), "chosen_ids": ids(seq_len - half), "rejected_ids": ids(seq_len - half - 1)}
            for _ in range(micro_batch)]


# --------------------------------------------------------------------------- the reference policy


def has_reference_adapter(model: nn.Module) -> bool:
    return REFERENCE_ADAPTER in getattr(model, "peft_config", {})


def add_reference_adapter(model: nn.Module, objective: "PreferenceObjective") -> None:
    """A run that continues from an adapter (model.adapter) keeps that adapter, frozen, as the
    reference of dpo/kto: loaded a second time, LoRA-sized, under the name "reference"."""
    path = objective.cfg.model.adapter
    if not (objective.uses_reference and path) or has_reference_adapter(model):
        return
    model.load_adapter(path, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    model.set_adapter("default")  # load_adapter leaves the trained one active; this also keeps it trainable


@contextlib.contextmanager
def reference_policy(model: nn.Module):
    """While active, `model` (a PeftModel) computes as the reference: the frozen "reference" adapter
    when it has one, else the base with every adapter disabled."""
    if not has_reference_adapter(model):
        with model.disable_adapter():
            yield
        return
    previous = model.active_adapter
    # set_adapter also sets requires_grad (active: trainable); inference_mode keeps everything
    # frozen meanwhile, and switching back makes the trained adapter trainable again.
    model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(previous)


# --------------------------------------------------------------------------- the objective


class PreferenceObjective(Objective):
    """The shared part of dpo, orpo, simpo and kto. Subclasses set `name`, `uses_reference` and
    implement `pair_loss` (paired) or override `loss_module` (kto)."""

    paired: ClassVar[bool] = True
    uses_reference: ClassVar[bool] = False
    batch_keys = ("input_ids", "position_ids", "seq_index", "weight")
    normaliser = "pairs"
    defining = ("pref.", "train.objective")
    metric_names: ClassVar[tuple[str, ...]] = ("rewards_chosen", "rewards_rejected", "reward_accuracy",
                                               "reward_margin", "logps_chosen", "logps_rejected")

    def check(self) -> None:
        """Settings that would silently do nothing with this objective are refused."""
        p, name = self.cfg.pref, self.name
        if p.loss_type != "sigmoid" and name != "dpo":
            raise UsageError(f"pref.loss_type={p.loss_type} is a DPO variant; train.objective={name} has one loss "
                             "of its own: leave pref.loss_type at sigmoid, or use train.objective=dpo")
        smoothing_for = "dpo's sigmoid and robust losses and simpo"
        if p.precompute_reference and name != "dpo":
            raise UsageError(f"pref.precompute_reference=true is for train.objective=dpo; {name} "
                             + ("estimates its KL term from each micro-batch, so its reference runs with it"
                                if name == "kto" else "has no reference"))
        if p.label_smoothing and (name in ("orpo", "kto") or (name == "dpo" and p.loss_type in ("hinge", "ipo"))):
            what = f"pref.loss_type={p.loss_type}" if name == "dpo" else f"train.objective={name}"
            raise UsageError(f"pref.label_smoothing={p.label_smoothing} does nothing with {what} (it applies to "
                             f"{smoothing_for}); set it to 0")

    def prepare(self, tokenizer, progress: bool = True):
        # Imported here: the data room's preference module is needed only by runs that train on pairs.
        from finetune.data.preference import prepare_preference

        bundle = prepare_preference(self.cfg.data, tokenizer, paired=self.paired, seed=self.cfg.train.seed,
                                    progress=progress)
        bundle.train, bundle.val = PreferenceUnits(bundle.train), PreferenceUnits(bundle.val)
        return bundle

    def collate(self, units: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
        collate = paired_collate if self.paired else unpaired_collate
        batch = collate(units, pad_id, pack=self.cfg.data.packing)
        if "ref_logps" in units[0]:  # precomputed (pref.precompute_reference): chosen..., rejected...
            batch["ref_logps"] = torch.tensor([u["ref_logps"][0] for u in units] + [u["ref_logps"][1] for u in units])
        return batch

    def inputs(self, batch: dict[str, torch.Tensor]) -> tuple:
        return super().inputs(batch) + ((batch["ref_logps"],) if "ref_logps" in batch else ())

    def attach(self, lossmod: nn.Module, data):
        """pref.precompute_reference: every unit's reference log-probs, in one no_grad pass in a
        fixed order and layout (so a resumed run computes the same values)."""
        if not (self.cfg.pref.precompute_reference and self.uses_reference and self.paired):
            return data
        device = next(lossmod.parameters()).device
        data.train, data.val = (PreferenceUnits(self._with_reference(lossmod, units, device))
                                for units in (data.train, data.val))
        return data

    def _with_reference(self, lossmod: nn.Module, units: Sequence[dict], device, per_batch: int = 8) -> list[dict]:
        out = []
        was_training = lossmod.training
        lossmod.eval()  # no dropout in the reference pass (the adapter is off anyway)
        for i in range(0, len(units), per_batch):
            chunk = [units[j] for j in range(i, min(i + per_batch, len(units)))]
            b = {k: v.to(device) for k, v in paired_collate(chunk, 0, pack=False).items()}
            sums, _ = lossmod.reference_logps(b["input_ids"], b["position_ids"], b["seq_index"], 2 * len(chunk))
            sums = sums.tolist()
            out += [{**u, "ref_logps": [sums[k], sums[len(chunk) + k]]} for k, u in enumerate(chunk)]
        lossmod.train(was_training)
        return out

    def blank(self, unit: dict) -> dict:
        return {**unit, "blank": True}

    def synthetic_batch(self, vocab: int, micro_batch: int, seq_len: int) -> dict[str, torch.Tensor]:
        units = synthetic_pairs(vocab, micro_batch, seq_len, self.cfg.train.seed)
        if not self.paired:  # as many sequences as pairs give: completions + their mismatched ones
            units = [{"prompt_ids": u["prompt_ids"], "completion_ids": u["chosen_ids"], "label": i % 2 == 0}
                     for i, u in enumerate(units)]
        return self.collate(units, pad_id=0)

    def trained_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Pairs (KTO: examples), not tokens: the step's loss is a mean over them."""
        return int(batch["weight"].sum())

    def loss_module(self, model: nn.Module) -> nn.Module:
        t = self.cfg.train
        add_reference_adapter(model, self)
        return PairLossModule(model, self, chunk=head_chunk(t, model), offload=t.offload_activations)

    def pair_loss(self, policy: Logps, reference: Optional[Logps]) -> PairLoss:
        raise NotImplementedError

    def step_metrics(self, outputs: list[tuple]) -> dict[str, torch.Tensor]:
        """Sums over the step's pairs (the loop divides by the step's pairs): outputs[2] of the loss
        module is a vector of sums in `metric_names` order."""
        total = sum(o[2] for o in outputs)
        return {name: total[i] for i, name in enumerate(self.metric_names)}


def pair_metrics(loss: PairLoss, policy: Logps, weight: torch.Tensor) -> torch.Tensor:
    """The sums `metric_names` name, over real pairs (weight 1)."""
    c, r = loss.chosen_rewards.detach(), loss.rejected_rewards.detach()
    return torch.stack([(weight * c).sum(), (weight * r).sum(), (weight * (c > r).float()).sum(),
                        (weight * (c - r)).sum(), (weight * policy.chosen.detach()).sum(),
                        (weight * policy.rejected.detach()).sum()])


class PairLossModule(nn.Module):
    """What Fabric wraps for a paired objective: forward(input_ids, position_ids, seq_index, weight)
    -> (sum of the pairs' losses, pairs, metric sums). The reference pass (when the objective
    has one) runs first, under no_grad."""

    def __init__(self, model: nn.Module, objective: PreferenceObjective, chunk: int = 0, offload: bool = False):
        super().__init__()
        self.model = model
        self.objective = objective
        self.chunk = chunk
        self.offload = offload

    def logps(self, input_ids, position_ids, seq_index, n_seqs: int):
        return sequence_logps(self.model, input_ids, position_ids, seq_index, n_seqs, self.chunk)

    def reference_logps(self, input_ids, position_ids, seq_index, n_seqs: int):
        # In eval mode: a frozen reference adapter's LoRA dropout would make the reference random.
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), reference_policy(self.model):
                return self.logps(input_ids, position_ids, seq_index, n_seqs)
        finally:
            self.model.train(was_training)

    def forward(self, input_ids, position_ids, seq_index, weight, ref_logps=None):
        n = weight.shape[0]
        ref = None
        if self.objective.uses_reference and ref_logps is None:
            s, _ = self.reference_logps(input_ids, position_ids, seq_index, 2 * n)
            ref_logps = s
        with offloaded(self.offload, pin_memory=input_ids.is_cuda):
            s, k = self.logps(input_ids, position_ids, seq_index, 2 * n)
        policy = Logps(s[:n], s[n:], k[:n], k[n:])
        if ref_logps is not None:
            ref_logps = ref_logps.to(s.dtype)
            ref = Logps(ref_logps[:n], ref_logps[n:], k[:n], k[n:])
        out = self.objective.pair_loss(policy, ref)
        return (weight * out.losses).sum(), (weight > 0).sum(), pair_metrics(out, policy, weight)
