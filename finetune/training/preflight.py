"""Checks of a run's settings against this machine and the model, before any work starts.

`finetune.config` checks what a setting can be on its own (ranges, choices, types). What needs
more than the config: the model's context length (its config.json, not its weights), whether the
loggers asked for can be imported, and whether a multi-node run has a launcher to start the
other nodes' processes. Each failure is one UsageError line, raised before data preparation,
model loading or anything written to out_dir; every process that becomes a rank runs them, so
none of them is left waiting for a rank that refused.
"""

from __future__ import annotations

import os
from typing import Optional

from finetune.config import Config
from finetune.errors import UsageError
from finetune.models.adapters import check_start_adapter
from finetune.training.logs import check_loggers
from finetune.training.objectives import objective_for


def check_run(cfg: Config) -> None:
    check_device(cfg)
    check_launch(cfg)
    check_loggers(cfg.output.loggers)  # the logger packages: one line naming the extra to install
    check_schedule(cfg)
    check_context(cfg)
    check_val_data(cfg)
    check_start_adapter(cfg)  # model.adapter: an adapter the recipe's LoRA shape agrees with
    objective_for(cfg).check()  # settings the objective cannot train with (e.g. a DPO variant for orpo)


# --------------------------------------------------------------------------- settings vs each other


def check_schedule(cfg: Config) -> None:
    """A warmup longer than the run never reaches train.lr: every step would run at a fraction of it."""
    t = cfg.train
    if t.warmup_steps > t.max_steps:
        raise UsageError(f"train.warmup_steps={t.warmup_steps} is longer than the run, train.max_steps={t.max_steps}: "
                         f"the lr would never reach train.lr={t.lr:g}; lower train.warmup_steps or raise train.max_steps")


def check_val_data(cfg: Config) -> None:
    """Validation data that is the training data measures memorisation, not generalisation."""
    if not cfg.data.val_path:
        return
    from finetune.data.sources import resolve

    train, val = resolve(cfg.data), resolve(cfg.data, val=True)
    same = ({f.resolve() for f in train.files} & {f.resolve() for f in val.files}) if val.files else \
        ({train.hub_id} if val.hub_id and val.hub_id == train.hub_id and val.split == train.split else set())
    if same:
        raise UsageError(f"data.val_path={cfg.data.val_path} is the training data ({train.name}): validation would "
                         "score rows it trained on; give held-out rows, or drop data.val_path and use "
                         "data.val_fraction")


# Which side of each named linear its LoRA factors span: (in, out) from the model's config.
def _linear_sides(mc) -> dict[str, tuple[int, int]]:
    h = getattr(mc, "hidden_size", None)
    heads = getattr(mc, "num_attention_heads", None)
    if not isinstance(h, int) or not isinstance(heads, int):
        return {}
    head_dim = getattr(mc, "head_dim", None) or h // heads
    kv = (getattr(mc, "num_key_value_heads", None) or heads) * head_dim
    inter = getattr(mc, "intermediate_size", None) or 4 * h
    return {"q_proj": (h, heads * head_dim), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (heads * head_dim, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def check_lora_rank(cfg: Config, model_config) -> None:
    """lora.r past min(in, out) of a layer it adapts adds parameters but no capacity (the update's
    rank cannot exceed it), and LoRA's scaling alpha/r then shrinks the update for nothing."""
    sides = _linear_sides(model_config)
    targets = cfg.lora.target_modules or []
    names = list(sides) if "all-linear" in targets else [t for t in targets if t in sides]
    for name in names:
        smallest = min(sides[name])
        if cfg.lora.r > smallest:
            raise UsageError(f"lora.r={cfg.lora.r} is larger than {name} of {cfg.model.name} ({sides[name][0]} -> "
                             f"{sides[name][1]}, rank at most {smallest}); use lora.r<={smallest}")


# --------------------------------------------------------------------------- devices and launcher


def check_device(cfg: Config) -> None:
    """The accelerator exists here, with as many GPUs as `devices` asks for (Fabric's own refusals
    are multi-line library errors)."""
    import torch

    from finetune.runtime import default_device

    device = default_device(cfg.accelerator)
    if device.type == "cuda" and cfg.devices > torch.cuda.device_count():
        raise UsageError(f"devices={cfg.devices} but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and cfg.devices > 1:
        raise UsageError(f"devices={cfg.devices} but MPS is one device; use devices=1")


LAUNCH_HELP = ("start one process per device on every node with a launcher: torchrun --nnodes={n} "
               "--nproc-per-node={d} --rdzv-endpoint=HOST:29500 -m finetune.cli ..., or srun under SLURM "
               "(docs/scale-out.md)")


def check_launch(cfg: Config) -> None:
    """num_nodes > 1 needs the other nodes' processes started by a launcher; Fabric alone starts
    only this node's, and they would wait for the rest forever."""
    if cfg.num_nodes > 1 and _launcher() is None:
        raise UsageError(f"num_nodes={cfg.num_nodes} but no launcher started this process, so the other "
                         f"node(s) would never join: " + LAUNCH_HELP.format(n=cfg.num_nodes, d=cfg.devices))


def _launcher() -> Optional[str]:
    """The cluster environment Fabric would use (its own detection), or None for a plain process."""
    from lightning.fabric.plugins.environments import (
        LSFEnvironment,
        MPIEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    for env in (SLURMEnvironment, TorchElasticEnvironment, LSFEnvironment, MPIEnvironment):
        if env.detect():
            return env.__name__
    # Lightning's own environment: each node started by hand with NODE_RANK and MASTER_ADDR set.
    if os.environ.get("NODE_RANK") and os.environ.get("MASTER_ADDR"):
        return "LightningEnvironment"
    return None


# --------------------------------------------------------------------------- model context


def model_context(model_config) -> Optional[int]:
    """Tokens the model's positions are trained for: max_position_embeddings, times the RoPE
    scaling factor when the config scales beyond it (linear/dynamic/yarn without an
    original_max_position_embeddings, i.e. max_position_embeddings is the unscaled length)."""
    from finetune.plan.shapes import context_length

    return context_length({"max_position_embeddings": getattr(model_config, "max_position_embeddings", None),
                           "rope_scaling": getattr(model_config, "rope_scaling", None)})


def check_context(cfg: Config) -> None:
    """data.seq_len within the model's context: past it the positions were never trained and the
    loss is nonsense. Reads config.json only (from the hub cache or the hub for a hub id)."""
    from transformers import AutoConfig

    from finetune.models.load import hub_kwargs, loading_errors, resolve_model_path

    path = resolve_model_path(cfg.model.name, cfg.model.revision)
    local = cfg.model.name.strip().lower() == "tiny" or os.path.isdir(os.path.expanduser(cfg.model.name))
    if cfg.model.revision and local:  # from_pretrained would ignore it: not the revision asked for
        raise UsageError(f"model.revision={cfg.model.revision} applies to hub ids, but {cfg.model.name} is a local "
                         "model; drop model.revision")
    with loading_errors(cfg.model.name, cfg.model.revision):
        model_config = AutoConfig.from_pretrained(path, **hub_kwargs(cfg.model.revision, cfg.model.trust_remote_code))
    ctx = model_context(model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config)
    if ctx is not None and cfg.data.seq_len > ctx:
        raise UsageError(f"data.seq_len={cfg.data.seq_len} is past the context of {cfg.model.name} ({ctx} tokens, "
                         f"max_position_embeddings in its config.json); use data.seq_len<={ctx}")
    check_lora_rank(cfg, model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config)
