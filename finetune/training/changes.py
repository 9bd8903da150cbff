"""What a resumed run may change, and how the changes it may make are applied and recorded.

A checkpoint's config.yaml is the config that trained it. On resume the new config is compared
with it, field by field (whether to resume, and from where, is finetune.training.state's):

- what defines the adapter (the base model, the LoRA shape and targets, quantization, the data
  and its order, the optimizer's kind, the objective's own settings) cannot change: the result
  would be an adapter of no run anyone asked for. The refusal names every changed field.
- the schedule (lr, warmup, decay, max_steps, weight decay, clipping) may change: users extend
  runs or lower a learning rate that diverged. The new values apply from the resume step on (the
  restored optimizer and scheduler would otherwise keep the old ones), and each checkpoint's
  config.yaml records the values in force plus, as comments, which values earlier steps ran with.
- anything else (cadence of logs and saves, memory savers, devices) changes freely: it does not
  change what is computed.
The data itself is compared too: every checkpoint's config.yaml ends with a fingerprint of the
training files, and a resume on other data is refused unless resume_changed_data=true.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Optional

import yaml

from finetune.config import Config, to_dict
from finetune.errors import UsageError
from finetune.training.objectives import objective_for

# Prefixes/keys whose change would make the resumed adapter another run's (with the objective's own).
DEFINING = ("model.", "lora.", "quant.", "data.", "train.seed", "train.global_batch_size", "train.optimizer",
            "train.objective")
# data.* settings that do not change which tokens are trained.
NOT_DEFINING = ("data.cache", "data.num_proc", "data.strict")
SCHEDULE = ("train.lr", "train.min_lr_ratio", "train.warmup_steps", "train.max_steps", "train.weight_decay",
            "train.max_grad_norm")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("columns", "roles"):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def saved_config(checkpoint_dir: Path) -> dict[str, Any]:
    """The flattened config a checkpoint was trained with ({} for a checkpoint without one)."""
    f = Path(checkpoint_dir) / "config.yaml"
    if not f.is_file():
        return {}
    try:
        data = yaml.safe_load(f.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return flatten(data) if isinstance(data, dict) else {}


def _show(v: Any) -> str:
    return "null" if v is None else str(v)


def schedule_changes(checkpoint_dir: Path, cfg: Config) -> dict[str, list]:
    """Refuse adapter-defining changes against the checkpoint's config (UsageError naming them);
    return the schedule fields that changed as {field: [old, new]}."""
    old = saved_config(checkpoint_dir)
    if not old:
        return {}
    new = flatten(to_dict(cfg))
    defining_keys = DEFINING + objective_for(cfg).defining
    defining, schedule = [], {}
    for key, value in new.items():
        if key not in old or old[key] == value:
            continue
        if key.startswith(defining_keys) and not key.startswith(NOT_DEFINING):
            defining.append(f"{key} {_show(old[key])} -> {_show(value)}")
        elif key in SCHEDULE:
            schedule[key] = [old[key], value]
    if defining:
        raise UsageError(f"resume from {checkpoint_dir}: changed settings that define the adapter: "
                         f"{'; '.join(defining)}; resume with the checkpoint's values or train into a new out_dir")
    return schedule


DATA_NOTE = "# data fingerprint: "


def data_fingerprint(cfg: Config) -> str:
    """The data a run trains on: a hash of its files' contents (hub datasets: id, revision, split,
    subset), plus the validation file's; recorded in every checkpoint's config.yaml."""
    from finetune.data.sources import resolve

    parts = [resolve(cfg.data).fingerprint()]
    if cfg.data.val_path:
        parts.append(resolve(cfg.data, val=True).fingerprint())
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def data_comment(fingerprint: str) -> str:
    return f"{DATA_NOTE}{fingerprint}\n" if fingerprint else ""


def check_same_data(checkpoint_dir: Path, cfg: Config, fingerprint: str) -> Optional[str]:
    """Refuse to resume on data other than the checkpoint's (UsageError naming both), unless
    resume_changed_data=true: then the note to print. Checkpoints without a fingerprint pass."""
    try:
        text = (Path(checkpoint_dir) / "config.yaml").read_text(encoding="utf-8")
    except OSError:
        return None
    m = re.search("^" + re.escape(DATA_NOTE) + r"(\w+)", text, re.M)
    if not m or m.group(1) == fingerprint:
        return None
    where = cfg.data.path or f"card {cfg.data.card}"
    if not cfg.resume_changed_data:
        raise UsageError(f"resume from {checkpoint_dir}: the training data changed since it was saved ({where}: "
                         f"fingerprint {m.group(1)[:12]} in the checkpoint, {fingerprint[:12]} now); resume on the "
                         "data it trained on, train into a new out_dir, or pass resume_changed_data=true")
    return (f"resume: the training data changed since {checkpoint_dir} ({where}); continuing on the new data "
            "(resume_changed_data=true)")


def describe(changes: dict[str, list]) -> str:
    return ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in changes.items())


def history_comments(history: list) -> str:
    """config.yaml's trailer: which schedule values the steps before each resume ran with."""
    lines = [f"# resumed at step {h['step']} with changed schedule: {describe(h['changes'])} "
             f"(steps up to {h['step']} ran with the old values)\n" for h in history]
    return "".join(lines)


def fresh_hyperparameters(optimizer) -> list[dict]:
    """The optimizer's param-group settings as the new config built them (before a restore)."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def apply_schedule(optimizer, scheduler, fresh: list[dict]) -> None:
    """After restoring optimizer and scheduler state: put back the new config's hyperparameters
    (load_state_dict restored the saved ones) and rebase the schedule on the new peak lr at the
    restored step. The lr lambda itself is the new config's (LambdaLR does not restore functions)."""
    for group, values in zip(optimizer.param_groups, fresh):
        group.update(values)
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    step = scheduler.last_epoch
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
