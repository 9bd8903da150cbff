"""What a recipe's settings decide a training step keeps, for finetune.plan.predict: the dtypes the
LoRA branches and norms compute and keep in, the attention and fused kernels training picks
(finetune.kernels), the masks packed rows carry, how many sequences a unit runs and whether a
reference adapter or the fused frozen-head loss is in play. Torch-free arithmetic on the config,
each function naming the training code whose choice it mirrors."""

from __future__ import annotations

from finetune.kernels import attention, liger_on


def _fp32_norms(cfg, c: int) -> bool:
    """Whether a k-bit model keeps peft's fp32 norms (finetune.runtime.kbit_frozen_dtypes: under
    fp16 only). Their fp32 output then makes the residual stream, and with it every checkpointed
    layer input, fp32 (bitsandbytes' Linear4bit returns its input's dtype)."""
    fp16 = cfg.quant.compute_dtype == "float16" or (cfg.quant.compute_dtype == "auto" and c == 2
                                                    and str(cfg.precision).startswith("16"))
    return cfg.quant.mode != "none" and fp16


def _autocast(cfg) -> bool:
    """Whether training runs under autocast: a *-mixed precision on a GPU (auto there is
    bf16-mixed); on the CPU precision=auto and *-true never autocast (finetune.runtime)."""
    if cfg.accelerator == "cpu":
        return False
    return cfg.precision in (None, "auto") or str(cfg.precision).endswith("-mixed")


def _lora_param_bytes(cfg, c: int) -> int:
    """Bytes per value of the LoRA weights (and their gradients): fp32, but under FSDP the one
    dtype of every parameter, the compute dtype (finetune.runtime.fsdp_param_dtype)."""
    return c if cfg.strategy == "fsdp" and cfg.devices * cfg.num_nodes > 1 else 4


def _lora_compute_bytes(cfg, c: int) -> int:
    """Bytes per value the LoRA branches compute in (finetune.runtime.lora_compute_dtype): the
    compute dtype where that is half precision (lora.compute_dtype=auto), else the LoRA weights'."""
    d = cfg.lora.compute_dtype
    if d == "float32" or (d == "auto" and c != 2):  # peft's branch: in the LoRA weights' dtype
        return _lora_param_bytes(cfg, c)
    return c if d == "auto" else 2


def _lora_copy_bytes(cfg, c: int) -> int:
    """Bytes per value of the copy of its input each LoRA branch makes and keeps for lora_A's
    weight gradient, 0 where it reads the compute-dtype input as it is: where the branch computes
    in the compute dtype (lora.compute_dtype=auto next to half frozen weights: autocast casts only
    the LoRA weights), and where the LoRA weights have that dtype (FSDP). peft's own fp32 branch
    (lora.compute_dtype=float32) casts a branch's input to the LoRA weights' dtype, each branch its
    own copy (q, k and v three): on a bf16 base an fp32 copy per branch (measured at bf16 frozen
    weights on a CPU: bench/results/plan-vs-measured-cpu-auto.json). Under autocast peft's
    bitsandbytes layers skip that cast and its plain Linear casts to fp32, which autocast casts
    back: a compute-dtype copy."""
    branch = _lora_compute_bytes(cfg, c)
    if branch == c:
        return 0
    if cfg.lora.compute_dtype != "float32":  # an explicit half branch next to fp32 frozen weights
        return branch
    if _autocast(cfg):
        return 0 if cfg.quant.mode != "none" else c
    return branch


def _upcast(c: int) -> int:
    """Bytes per value of an fp32 upcast and its compute-dtype source (one tensor when that is fp32)."""
    return 4 + (0 if c == 4 else c)


def _attention(cfg) -> str:
    """The attention implementation training loads (finetune.kernels.attention: auto = flash on a
    GPU with flash-attn installed, else sdpa); any accelerator but cpu plans for a CUDA GPU."""
    return attention(cfg.model.attn_implementation, cfg.accelerator != "cpu")


def _liger(cfg) -> bool:
    """Whether training runs Liger's kernels (finetune.kernels.liger_on: auto = on a GPU with liger-kernel)."""
    return liger_on(cfg.train.liger, cfg.accelerator != "cpu")


def _norm_saved(cfg, c: int, h: int) -> int:
    """What one RMSNorm keeps per token: its fp32 input (the class upcasts) and rsqrt; Liger's
    fused RMSNorm keeps its input as it came (the residual stream's dtype) and one fp32 rstd."""
    if not _liger(cfg):
        return 4 * h + 4
    return (4 if _fp32_norms(cfg, c) else c) * h + 4


def _lean_cpu_attention(cfg) -> bool:
    return cfg.accelerator == "cpu" and cfg.train.lean_activations and _attention(cfg) == "sdpa"


def _mask_bytes(cfg, micro_batch: int, seq: int, c: int) -> int:
    """Attention masks kept for backward once per forward, for packed rows (position ids
    restarting): finetune.memory.lean's CPU attention keeps one float micro_batch x seq x seq mask.
    transformers' own mask (boolean for sdpa, compute dtype for eager) is gone by the time the loss
    or backward peaks, and sdpa's per-layer float copies count with the layer."""
    if not _masked(cfg) or not _lean_cpu_attention(cfg):
        return 0
    return 4 * micro_batch * seq * seq


def _masked(cfg) -> bool:
    """Whether rows carry position ids restarting (attention then gets a block-diagonal mask):
    packed SFT data, and every preference batch (its pairs' sequences end in padding or share rows)."""
    return cfg.data.packing or _sequences_per_unit(cfg) > 1


def _sequences_per_unit(cfg) -> int:
    """Sequences one unit of the micro-batch runs in the forward: a preference pair is two (chosen
    and rejected; KTO: the completion and its mismatched KL sequence), an SFT unit one."""
    return 1 if getattr(cfg.train, "objective", "sft") == "sft" else 2


def _reference_adapter(cfg) -> bool:
    """Whether a second, frozen copy of the adapter is loaded: dpo/kto continuing from model.adapter."""
    return bool(getattr(cfg.model, "adapter", None)) and getattr(cfg.train, "objective", "sft") in ("dpo", "kto")


def _fused_head(cfg, targets: set[str]) -> bool:
    """Whether training's loss takes finetune.memory.lean's fused frozen-head cross-entropy: a chunked loss
    and a head that neither LoRA nor modules_to_save trains (finetune.training.loss.head_loss_sum)."""
    return (cfg.train.loss_chunk_size > 0 and "lm_head" not in targets
            and "lm_head" not in cfg.lora.modules_to_save)
