"""Training objectives, one module each (base.Objective says what one owns).

Adding one is a module with its Objective subclass and loss, an entry in OBJECTIVES, its data
adapter in finetune.data, and tests mirroring it.
"""

from __future__ import annotations

from finetune.config import Config
from finetune.errors import UsageError, did_you_mean
from finetune.training.objectives.base import Objective
from finetune.training.objectives.dpo import DPO
from finetune.training.objectives.kto import KTO
from finetune.training.objectives.orpo import ORPO
from finetune.training.objectives.sft import SFT
from finetune.training.objectives.simpo import SimPO

OBJECTIVES: dict[str, type[Objective]] = {"sft": SFT, "dpo": DPO, "orpo": ORPO, "simpo": SimPO, "kto": KTO}


def get_objective(name: str) -> type[Objective]:
    """The objective registered as `name`; a UsageError naming the known ones otherwise."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise UsageError(f"unknown training objective {name!r}{did_you_mean(name, OBJECTIVES)}; "
                         f"known: {', '.join(OBJECTIVES)}") from None


def objective_for(cfg: Config) -> Objective:
    """The objective `cfg` trains with (train.objective): the one place a run picks it."""
    return get_objective(cfg.train.objective)(cfg)
