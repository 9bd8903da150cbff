"""Sequence-tiled MLPs: the decoder MLPs run over the tokens `tile` at a time, each tile under
activation checkpointing.

At long sequence lengths the MLP dominates what one layer needs in backward: Llama-3.1-8B's
gate/up outputs are 14336 wide (3.5x the hidden size), autograd keeps two or three tensors that
wide per token, and backward holds their gradients on top. An MLP is token-wise, so running it on
slices of the sequence and concatenating is the same math; with each slice under non-reentrant
`torch.utils.checkpoint` only the slice's input is kept, and backward recomputes one tile's
intermediates at a time (the idea of Arctic's and unsloth's TiledMLP). The price is one more MLP
forward per layer in backward.

It composes with what else wraps the layer, because torch's checkpoint saves its inputs through
the ambient saved-tensor hooks: under HF gradient checkpointing (a non-reentrant checkpoint around
the decoder layer) the tile inputs are dropped and recomputed with the layer, under
`train.offload_activations` (save_on_cpu) they wait in CPU RAM. Its RNG stash makes LoRA dropout
draw the same masks when a tile is recomputed. Each tile runs the forward the MLP had before
tiling (the class's, finetune.memory.lean's SwiGLU or Liger's), so tile last (finetune.memory.apply).
"""

from __future__ import annotations

import logging
import types
from typing import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

log = logging.getLogger(__name__)

_INNER = "_finetune_untiled_forward"
_TILE = "_finetune_mlp_tile"


def _tiled_forward(self, x, *args, **kwargs):
    inner = getattr(self, _INNER)
    tile = getattr(self, _TILE)
    # Only training is tiled: tiles exist to shrink what autograd keeps, and without grad a tile
    # loop would merge the batch rows (peft's per-row adapter_names in inference relies on them).
    if (args or kwargs or not torch.is_grad_enabled() or not isinstance(x, torch.Tensor) or x.dim() < 2
            or x.shape[:-1].numel() <= tile):
        return inner(x, *args, **kwargs)
    n = x.shape[:-1].numel()
    # split (not a loop of slices): its backward concatenates the tile gradients once, where
    # slicing would make a zero-filled full-size gradient per tile.
    tiles = x.reshape(1, n, x.shape[-1]).split(tile, dim=1)
    out = torch.cat([checkpoint(inner, t, use_reentrant=False) for t in tiles], dim=1)
    return out.view(*x.shape[:-1], out.shape[-1])


def decoder_mlps(model: nn.Module) -> Iterator[nn.Module]:
    """The dense MLP of every decoder layer of a transformers model (or a peft model around one):
    direct children whose class name ends in "MLP" of the layers transformers checkpoints or keeps
    whole on one device. MoE blocks (MixtralSparseMoeBlock, ...) do not qualify: their router
    output is recorded per call, so tiling them is not the same computation; their experts
    (classes ending in MLP too) sit one level deeper."""
    for layer in decoder_layers(model):
        for child in layer.children():
            if type(child).__name__.endswith("MLP"):
                yield child


def decoder_layers(model: nn.Module) -> Iterator[nn.Module]:
    """The decoder layers of a transformers model (or a peft model around one): the modules
    transformers checkpoints (GradientCheckpointingLayer) or keeps whole on one device
    (_no_split_modules). Also what train.compile compiles (finetune.training.compile)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_names = set(getattr(base, "_no_split_modules", None) or ())
    for layer in base.modules():
        if isinstance(layer, GradientCheckpointingLayer) or type(layer).__name__ in layer_names:
            yield layer


def _is_tiled(module: nn.Module) -> bool:
    return getattr(vars(module).get("forward"), "__func__", None) is _tiled_forward


def tile_mlps(model: nn.Module, tile: int) -> int:
    """Run every decoder MLP of `model` (see `decoder_mlps`) `tile` tokens at a time in training;
    returns how many MLPs are tiled. Idempotent, and a second call after something replaced an
    MLP's forward (Liger) tiles the new forward."""
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    n = 0
    for mlp in decoder_mlps(model):
        if not _is_tiled(mlp):
            setattr(mlp, _INNER, mlp.forward)
            mlp.forward = types.MethodType(_tiled_forward, mlp)
        setattr(mlp, _TILE, int(tile))
        n += 1
    log.debug("MLP tiling: %d MLPs, %d tokens per tile", n, tile)
    return n


def untile_mlps(model: nn.Module) -> int:
    """Undo `tile_mlps` (each MLP gets back the forward it had); returns how many were restored."""
    n = 0
    for mlp in model.modules():
        if _is_tiled(mlp):
            inner = vars(mlp).pop(_INNER)
            del mlp.forward, mlp._finetune_mlp_tile
            if getattr(inner, "__func__", None) is not type(mlp).forward:
                mlp.forward = inner  # an instance forward (lean, Liger) that was there before
            n += 1
    return n
