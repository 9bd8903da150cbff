"""The deterministic order in which units are consumed: resumable from the step number alone.

The stream is the concatenation of per-epoch permutations of the units (torch.Generator seeded
with seed + epoch). Optimizer step g consumes stream[g*G:(g+1)*G] (G = global batch size in
units); rank r takes items r::world_size of it, in micro-batches. Every device count therefore
sees the same units per step, and a resumed run needs nothing but the step to continue exactly.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from finetune.data.pack import collate


class BatchStream:
    def __init__(self, units: Sequence[dict], global_batch_size: int, micro_batch_size: int,
                 world_size: int = 1, rank: int = 0, seed: int = 0, group_by_length: bool = False,
                 pad_id: int = 0, collate: Callable[[Sequence[dict], int], dict] = collate):
        if not len(units):
            raise ValueError("BatchStream needs at least one unit")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.units = units
        self.G, self.micro = int(global_batch_size), int(micro_batch_size)
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.group_by_length, self.pad_id = group_by_length, pad_id
        self.collate = collate  # units -> a micro-batch: the training objective's (SFT: pack.collate)
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed + epoch)
            if len(self._perms) > 4:  # only the epochs around the current step are ever needed
                self._perms.clear()
            self._perms[epoch] = torch.randperm(len(self.units), generator=g).tolist()
        return self._perms[epoch]

    def global_indices(self, step: int) -> list[int]:
        """Unit indices of optimizer step `step` (all ranks), in consumption order."""
        n = len(self.units)
        out = []
        for i in range(step * self.G, (step + 1) * self.G):
            out.append(self._perm(i // n)[i % n])
        if self.group_by_length:
            lengths = self.units.lengths() if hasattr(self.units, "lengths") else None
            size = (lambda j: int(lengths[j])) if lengths is not None else (lambda j: len(self.units[j]["input_ids"]))
            out.sort(key=lambda j: -size(j))  # stable: ties keep stream order
        return out

    def rank_indices(self, step: int) -> list[list[int]]:
        """This rank's unit indices at `step`, chunked into micro-batches."""
        mine = self.global_indices(step)[self.rank::self.world_size]
        return [mine[i:i + self.micro] for i in range(0, len(mine), self.micro)]

    def step_batches(self, step: int) -> list[dict]:
        """Collated micro-batches for this rank at optimizer step `step` (0-based)."""
        return [self.collate([self.units[j] for j in chunk], self.pad_id) for chunk in self.rank_indices(step)]

    def epoch_at(self, step: int) -> float:
        """Epochs completed before `step` (fractional)."""
        return step * self.G / len(self.units)
