"""What a training objective owns, and so what the loop, checkpoints, resume, the measured step and
`finetune data` ask it rather than assume.

An objective turns the recipe's data into units, collates micro-batches with its own batch keys,
wraps the peft model in a loss module and says what the step is normalised by. The loop stays
the same for every objective: it sums the loss modules' outputs over micro-batches and ranks,
divides by the step's normaliser, and backpropagates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Sequence

import torch
from torch import nn

from finetune.config import Config

if TYPE_CHECKING:
    from finetune.data.pipeline import DataBundle


class Objective(ABC):
    """One training method (SFT, later preference objectives). Subclasses set `name`, `batch_keys`
    and `defining`, and implement the abstract methods.

    The loss module (`loss_module`) is what Fabric wraps: its forward takes the batch's tensors in
    `batch_keys` order and returns (loss summed over the micro-batch, the normaliser it holds, ...);
    it keeps the peft model as `.model` (checkpoints name parameters through it, see
    finetune.training.distributed.CheckpointState).
    """

    name: ClassVar[str]
    batch_keys: ClassVar[tuple[str, ...]]
    """The collated tensors, in the order the loss module's forward takes them."""
    normaliser: ClassVar[str] = "trained_tokens"
    """What `trained_tokens` counts, as the throughput metric names it ({normaliser}_per_s)."""
    defining: ClassVar[tuple[str, ...]] = ()
    """Config keys (or key prefixes) of this objective that define the adapter it trains: a resumed
    run may not change them (finetune.training.changes)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    # --------------------------------------------------------------------------- data

    @abstractmethod
    def prepare(self, tokenizer, progress: bool = True) -> "DataBundle":
        """The recipe's data as training and validation units, with their statistics."""

    @abstractmethod
    def collate(self, units: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """Units -> one micro-batch: a tensor per name in `batch_keys`."""

    @abstractmethod
    def blank(self, unit: dict) -> dict:
        """A unit like `unit` worth nothing (no loss, no normaliser): what a rank with fewer
        validation units runs so every rank runs equally many forwards."""

    def attach(self, lossmod: nn.Module, data: "DataBundle") -> "DataBundle":
        """`data` with what the objective computes once from the built model before training (the
        loop calls it after building the step). Nothing by default."""
        return data

    @abstractmethod
    def synthetic_batch(self, vocab: int, micro_batch: int, seq_len: int) -> dict[str, torch.Tensor]:
        """A micro-batch of random tokens shaped as training's at this size (the measured step)."""

    # --------------------------------------------------------------------------- the loss

    @abstractmethod
    def loss_module(self, model: nn.Module) -> nn.Module:
        """The module Fabric wraps around the peft model `model` (see the class docstring)."""

    @abstractmethod
    def trained_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """What the micro-batch adds to the step's normaliser (the loss is the sum over the step's
        micro-batches and ranks divided by the sum of this)."""

    def check(self) -> None:
        """Refuse settings this objective cannot train with (UsageError, one line), before any work."""

    def inputs(self, batch: dict[str, torch.Tensor]) -> tuple:
        """The loss module's positional arguments from a micro-batch."""
        return tuple(batch[k] for k in self.batch_keys)

    def step_metrics(self, outputs: list[tuple]) -> dict[str, torch.Tensor]:
        """What to log beyond train_loss, from the loss module's (detached) outputs on this rank's
        micro-batches of a step: {name: a sum}, which the loop sums over ranks and divides by the
        step's normaliser, or {name: a [sum, count] tensor}, logged as the sum over the count (both
        summed over ranks; not logged at a step where the count is 0). None by default."""
        return {}
