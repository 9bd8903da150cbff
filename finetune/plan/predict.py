"""`finetune plan`: predict peak GPU memory of a recipe, itemised, and what fits a budget.

Everything here is arithmetic on the model's shape, so a 70B model can be planned on a laptop
without downloading it and without importing torch. The shape comes from a local HF config.json
(a local directory or the HF hub cache), else from litgpt's config registry (loaded as a single
file so litgpt's torch-importing package __init__ never runs).

What autograd keeps and when the step peaks is checked against measured training steps on the
CPU (`finetune plan ... measure=true`, finetune.training.measure; bench/plan_vs_measured.py: 8 SmolLM2
configs within +3% at fp32, within +5% at bf16 frozen weights with peft's fp32 LoRA branch, +1.5%
with the default bf16 branch; tests/training/test_measure.py). The GPU-only constants are not measured yet
(bench/gpu_qlora.py compares against a GPU when one is available). Sources for those:
- bitsandbytes 0.50 NF4 layout (read from its source): 4-bit codes packed 2 per byte, one fp32
  absmax per 64 weights; with double quant the absmax become uint8 with one fp32 absmax per 256
  of them. For Llama-2-7B this gives 3.87 GB (linears 3.34 GB + bf16 embeddings/lm_head 0.52 GB),
  matching the widely quoted ~3.9 GB `get_memory_footprint()` of a 4-bit Llama-2-7B.
- bitsandbytes 8-bit optimizers: 1 byte per state value x 2 states, fp32 absmax per 256 values,
  and tensors under 4096 elements stay 32-bit (`min_8bit_size`).
- bitsandbytes MatMul4Bit saves only the packed weight for backward (not its input), and torch's
  linear does not save the input of a frozen weight: only LoRA branches keep linear inputs alive.
- litgpt's published Llama-2-7B QLoRA run (13.68 GB at micro-batch 2 x seq 512, r=32 on q,v,
  no checkpointing, no chunked loss) is ~ the size of the full bf16 checkpoint (6.74e9 x 2 B =
  13.48 GB), i.e. it records the load-time peak, not the training step; this planner gives
  ~10.2 GB allocated (before context and slack) for that training step, so the published number
  is an upper bound, not a calibration point for activations."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Optional

from finetune.cpuprobe import planned_cpu_precision
from finetune.errors import UsageError
from finetune.kernels import varlen
from finetune.plan.choices import (  # noqa: F401  (_fp32_norms: tests import it from here)
    _fp32_norms, _autocast, _lora_param_bytes, _lora_compute_bytes, _lora_copy_bytes, _upcast, _attention, _liger, _norm_saved, _lean_cpu_attention, _mask_bytes, _masked, _sequences_per_unit, _reference_adapter, _fused_head)
from finetune.plan.moe import moe_parts
from finetune.plan.shapes import Shape, model_shape
from finetune.ranges import parse_size

GiB = 1024**3
MiB = 1024**2
CUDA_CONTEXT_BYTES = 500 * MiB  # CUDA context + cuBLAS/cuDNN workspaces, outside torch's allocator
NF4_BLOCK = 64  # bitsandbytes 4-bit blocksize
DQ_BLOCK = 256  # double-quant blocksize (of the absmax values)
OPT8_BLOCK = 256  # bitsandbytes 8-bit optimizer blocksize
OPT8_MIN_SIZE = 4096  # smaller tensors keep 32-bit optimizer state

LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
_TARGET_ALIASES = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
    "w1": "gate", "w3": "up", "w2": "down", "lm_head": "lm_head",
}


@dataclass
class Plan:
    model: str
    shape: Shape
    world_size: int
    strategy: str
    micro_batch: int
    seq_len: int
    parts: dict[str, int]
    notes: dict[str, str] = field(default_factory=dict)
    activations_detail: dict[str, int] = field(default_factory=dict)
    load_peak_bytes: int = 0  # while the model loads, before the first step (_load_peak)

    @property
    def peak_bytes(self) -> int:
        return sum(self.parts.values())


# --------------------------------------------------------------------------- the prediction


def parse_bytes(text: str) -> int:
    """'12GiB' -> 12*2**30, '24GB' -> 24e9, '16000MiB', '1e10' (bytes): finetune.ranges.parse_size."""
    return parse_size(text, "gpu_memory")


def _targets(cfg) -> set[str]:
    out: set[str] = set()
    for t in cfg.lora.target_modules:
        if t == "all-linear":
            out |= set(LINEARS)
        elif t in _TARGET_ALIASES:
            out.add(_TARGET_ALIASES[t])
        elif t in LINEARS:
            out.add(t)
        else:
            names = ["all-linear", *_TARGET_ALIASES]
            close = difflib.get_close_matches(t, names, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UsageError(f"lora.target_modules: the planner does not know module '{t}'{hint}")
    return out


def _compute_bytes(cfg) -> int:
    """Bytes per value of the compute dtype, which finetune.runtime also gives the frozen
    embeddings, head and norms (kbit_frozen_dtypes). precision=auto on a CPU is what training picks
    there (bf16 frozen weights where the CPU probe measured bf16 faster, else fp32), read from
    FINETUNE_CPU_PRECISION or the probe's cache without torch (finetune.cpuprobe); fp32 while the
    probe has not run (_auto_cpu_unprobed)."""
    if cfg.quant.compute_dtype != "auto":
        return 4 if cfg.quant.compute_dtype == "float32" else 2
    precision = cfg.precision if cfg.precision not in (None, "auto") else \
        ((planned_cpu_precision() or "32-true") if cfg.accelerator == "cpu" else "bf16-mixed")
    return 4 if precision.startswith(("32", "64")) else 2


def _auto_cpu_unprobed(cfg) -> bool:
    return cfg.accelerator == "cpu" and cfg.precision in (None, "auto") and planned_cpu_precision() is None


def _quant_bytes(n: int, out_features: int, mode: str, double_quant: bool, c: int) -> tuple[int, int]:
    """(shardable bytes, per-device-replicated bytes) of one frozen linear weight with n values."""
    if mode == "nf4":
        blocks = math.ceil(n / NF4_BLOCK)
        if double_quant:  # uint8 absmax + fp32 absmax per 256 of them + 256-entry fp32 code + offset
            stats = blocks + 4 * math.ceil(blocks / DQ_BLOCK) + 4 * 256 + 4
        else:
            stats = 4 * blocks
        return (n + 1) // 2, stats + 4 * 16  # + the 16-value NF4 code
    if mode == "int8":
        return n, 4 * out_features  # LLM.int8 row-wise fp32 scales (SCB)
    return n * c, 0


def _opt_bytes(numel: int, optimizer: str) -> int:
    if optimizer.endswith("8bit") and numel >= OPT8_MIN_SIZE:
        return 2 * numel + 2 * 4 * math.ceil(numel / OPT8_BLOCK)
    return 8 * numel


def _mlp_tiled(s: Shape, cfg, tokens: int) -> bool:
    """Whether train.mlp_tile_size splits this micro-batch (finetune.memory.tiled leaves MoE blocks and
    micro-batches of at most one tile untiled)."""
    return 0 < cfg.train.mlp_tile_size < tokens and not s.n_expert


def _layer_activation_bytes(s: Shape, cfg, c: int, targets: set[str], seq: int,
                            tiled: bool = False) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes saved for backward by one decoder layer (HF Llama + peft + bitsandbytes): (per token,
    per MLP tile token). The second is empty unless the MLP is tiled; then its intermediates and
    LoRA inputs exist for one tile at a time, and the tile inputs (the MLP's input) per token.

    Only tensors autograd keeps count: a frozen linear (4-bit or not) keeps nothing, a LoRA branch
    keeps its input (the dropout output + bool mask when dropout > 0, else the shared input).
    """
    h, i, r, qd = s.hidden, s.intermediate, cfg.lora.r, s.q_dim
    drop = cfg.lora.dropout > 0
    k = max(s.expert_top_k, 1) if s.n_expert else 1
    lin = s.linears()

    # A LoRA branch reads its own copy of its input where it computes in another dtype than its
    # input's (_lora_copy_bytes: peft's fp32 branch on a half base, lora.compute_dtype=float32);
    # dropout then runs on that copy. Otherwise it shares the compute-dtype input others keep.
    copy = _lora_copy_bytes(cfg, c)
    d_in = copy or c  # dtype bytes of what the branch's dropout and lora_A see
    a_out = c if _autocast(cfg) else _lora_compute_bytes(cfg, c)  # lora_A's output, kept for lora_B
    # Dropout keeps its output and its mask: a bool mask on CUDA (native_dropout), on the CPU a
    # noise tensor of its input's dtype (torch's unfused dropout multiplies by scaled Bernoulli noise).
    drop_bytes = (2 * d_in if cfg.accelerator == "cpu" else 1 + d_in) if drop else copy
    shared = not drop and not copy  # the branch keeps nothing of its input beyond what others keep

    def lora_in(name: str) -> int:  # what the LoRA branch of `name` keeps per token
        if name not in targets:
            return 0
        size = lin[name][0] * (k if name in ("gate", "up", "down") else 1)
        extra = c * size if cfg.lora.use_dora else 0  # DoRA keeps the base output for its rescale
        return drop_bytes * size + a_out * r + extra

    # RMSNorm upcasts to fp32: keeps the fp32 input and rsqrt; its output only if a LoRA reads it
    # as it is (no dropout, no cast).
    norm_out = lambda names: c * h if (set(names) & targets and shared) else 0  # noqa: E731
    # transformers' sdpa path repeats k/v to n_head when a mask is passed (packing), and torch turns
    # the boolean mask into an additive one in the compute dtype in every layer, which the
    # attention's backward keeps (seq keys per token). flash_attention_2 takes neither (packed rows
    # run varlen, with no mask at all), nor does flex_attention (a block mask, k/v unrepeated);
    # nor does finetune.memory.lean's CPU attention (k/v unrepeated, one float mask per forward: _mask_bytes).
    attn = _attention(cfg)
    lean_cpu = _lean_cpu_attention(cfg)
    kv = s.kv_dim if varlen(attn) or attn == "flex_attention" or lean_cpu else qd
    layer_mask = c * seq if (attn == "sdpa" and _masked(cfg) and not lean_cpu) else 0
    # gate, up and silu(gate) for a SwiGLU MLP; two with finetune.memory.lean's or Liger's SwiGLU
    # (both keep gate and up and recompute silu in backward).
    liger = _liger(cfg)
    mlp_saved = (2 if cfg.train.lean_activations or liger else 3) if s.gated_mlp else 1
    mlp_linears = ("gate", "up", "down")
    mlp = {
        "mlp": k * c * i * mlp_saved + (k * c * i if "down" in targets and shared else 0)
        + (4 * s.n_expert if s.n_expert else 0),
        "lora": sum(lora_in(n) for n in lin if n in mlp_linears),
    }
    d = {
        # tiled, the tile checkpoints keep the MLP's input whether or not a LoRA reads it
        "norms": 2 * _norm_saved(cfg, c, h) + norm_out("qkv") + (c * h if tiled else norm_out(("gate", "up"))),
        # q, k, v, the output and its logsumexp; o's LoRA input adds no tensor of its own with
        # sdpa (saved-tensor trace on CPU; flash assumed alike), one with eager
        "attention": c * (qd + 2 * kv) + c * qd + 4 * s.n_head + layer_mask
        + (c * qd if "o" in targets and shared and attn == "eager" else 0),
        "mlp": 0 if tiled else mlp["mlp"],
        "lora": sum(lora_in(n) for n in lin if n not in mlp_linears) + (0 if tiled else mlp["lora"]),
    }
    if attn == "eager":  # softmax in fp32 (+ its compute-dtype copy), per key
        d["attention"] += _upcast(c) * s.n_head * seq
    return d, (mlp if tiled else {})


def _load_peak(s: Shape, cfg, c: int, weights: int, unquant: int, on_cpu: bool) -> int:
    """Bytes on the device while the model loads (every rank loads all of it, FSDP too): the
    frozen weights as stored (`weights`: quantized linears with their constants; `unquant`:
    embeddings, head, norms in the compute dtype; finetune.models.load no longer lets peft's
    k-bit preparation round-trip them through fp32) plus the largest transient. bitsandbytes
    quantizes each linear as it arrives (one weight in the compute dtype at a time).

    A MoE's fused expert stacks are no Linear (finetune.models.experts packs them after loading).
    On a GPU the NF4 model loads on the CPU, each stack is packed onto the device alone and the
    rest follows packed (finetune.models.load.load_pretrained): the peak is the larger of the
    experts packed plus the largest stack unpacked and the whole model packed. On the CPU it loads
    where it runs: all stacks unpacked at once, then packed."""
    mode = cfg.quant.mode
    biggest = max(fin * fout for fin, fout, _ in s.linears().values())
    transient = biggest * c if mode != "none" else 0
    total = weights + unquant + transient
    if s.n_expert and mode == "nf4":  # `weights` counts the experts packed; at load they are not yet
        mlp = {n: v for n, v in s.linears().items() if n in ("gate", "up", "down")}
        if on_cpu:
            per_expert = sum(fin * fout for fin, fout, _ in mlp.values())
            total = weights + unquant + s.n_layer * s.n_expert * (per_expert * c - (per_expert + 1) // 2)
        else:
            packed = s.n_layer * sum(n * sum(_quant_bytes(fin * fout, fout, mode, cfg.quant.double_quant, c))
                                     for fin, fout, n in mlp.values())
            up = mlp["up"][0] * mlp["up"][1] * (2 if s.gated_mlp else 1)  # gate_up_proj, one expert
            stack = s.n_expert * max(up, mlp["down"][0] * mlp["down"][1])
            total = max(packed + stack * c, weights + unquant)
    return total + (0 if on_cpu else CUDA_CONTEXT_BYTES)


def predict(cfg, micro_batch: Optional[int] = None, seq_len: Optional[int] = None,
            slack: float = 0.10) -> Plan:
    """Peak memory per device of one training step of `cfg`, itemised (bytes)."""
    s = model_shape(cfg.model.name, cfg.model.revision)
    c = _compute_bytes(cfg)
    mode, targets = cfg.quant.mode, _targets(cfg)
    world = cfg.devices * cfg.num_nodes
    fsdp = cfg.strategy == "fsdp" and world > 1
    shard = world if fsdp else 1
    on_cpu = cfg.accelerator == "cpu"
    mb = micro_batch or (cfg.train.micro_batch_size if isinstance(cfg.train.micro_batch_size, int) else 1)
    seq = seq_len or cfg.data.seq_len
    rows = mb * _sequences_per_unit(cfg)  # a micro-batch of mb pairs runs 2 x mb sequences
    tokens = rows * seq
    L, h, V = s.n_layer, s.hidden, s.vocab
    notes: dict[str, str] = {}

    # Frozen weights. FSDP shards parameters; bitsandbytes' quant state is not a parameter, so
    # every rank keeps all of it.
    w_shard = w_repl = 0
    layer_weight = 0
    for name, (fin, fout, n) in s.linears().items():
        a, b = _quant_bytes(fin * fout, fout, mode, cfg.quant.double_quant, c)
        w_shard += L * n * a
        w_repl += L * n * b
        layer_weight += n * a
    embed = V * h * c
    head = 0 if s.tied else V * h * c
    r = 4 if _fp32_norms(cfg, c) else c  # bytes per value of the residual stream and the norms
    norms_bias = (L * 2 * h + h) * r + L * ((s.q_dim + 2 * s.kv_dim) * s.qkv_bias + h * s.n_expert) * c
    unquant = embed + head + norms_bias

    # Trainable tensors: LoRA A (r x in), B (out x r) per adapted linear, fp32 (peft upcasts
    # adapters of a bf16 base); modules_to_save are full trainable copies.
    trainable: list[int] = []
    for name, (fin, fout, n) in s.linears().items():
        if name in targets:
            for _ in range(L * n):
                trainable += [cfg.lora.r * fin, fout * cfg.lora.r] + ([fout] if cfg.lora.use_dora else [])
    if "lm_head" in targets:
        trainable += [cfg.lora.r * h, V * cfg.lora.r]
    for m in cfg.lora.modules_to_save:
        if m in ("lm_head", "embed_tokens"):
            trainable.append(V * h)
    n_train = sum(trainable)
    lora_bytes = _lora_param_bytes(cfg, c)
    opt = sum(_opt_bytes(t, cfg.train.optimizer) for t in trainable)
    if cfg.train.optimizer.startswith("paged"):
        notes["optimizer_state"] = "paged: can spill to CPU RAM under pressure"
    if fsdp:  # flat sharded params: every shard is large enough for 8-bit state
        opt = _opt_bytes(n_train // shard, cfg.train.optimizer) if n_train else 0

    # Activations.
    tiled = _mlp_tiled(s, cfg, tokens)
    mlp_tokens = cfg.train.mlp_tile_size if tiled else tokens  # MLP intermediates exist for this many
    per_tok, per_tile = _layer_activation_bytes(s, cfg, c, targets, seq, tiled)
    # Every layer keeps per_tok; a tiled MLP's intermediates live for one tile of one layer at a time.
    tile_live = sum(per_tile.values()) * mlp_tokens
    layer_kept = sum(per_tok.values()) * tokens
    layer_full = layer_kept + tile_live
    # The final norm keeps its fp32 input and rsqrt; its output only where the chunked loss
    # checkpoints a trained head's chunks (a frozen head keeps nothing of its input).
    chunked_plain = cfg.train.loss_chunk_size > 0 and not _fused_head(cfg, targets)
    final_norm = (4 * h + 4 + (c * h if chunked_plain else 0)) * tokens
    offload = cfg.train.offload_activations and not on_cpu  # on the CPU there is nowhere to offload to
    ckpt_inputs = r * h * tokens * (2 if offload else L)
    masks = _mask_bytes(cfg, rows, seq, c)
    with_ckpt = ckpt_inputs + layer_full + final_norm + masks  # all layer inputs + one layer recomputed
    without_ckpt = L * layer_kept + tile_live + final_norm + masks + (c * h * tokens if offload else 0)
    if offload and not cfg.train.gradient_checkpointing:
        without_ckpt = 2 * layer_kept + tile_live + final_norm + masks  # saved tensors stream to CPU RAM
    # Kept from forward to backward; under checkpointing the layer being recomputed is a backward
    # transient instead (below).
    if cfg.train.gradient_checkpointing:
        # In fp32 the first norm's "fp32 input" is the layer input itself, which the checkpoint keeps.
        kept, recomputed = with_ckpt - layer_full, layer_full - (4 * h * tokens if c == 4 else 0)
    else:
        kept, recomputed = without_ckpt, 0
    # Backward of one layer peaks in its MLP (of one tile when tiled): the gradient of the
    # activation product and a copy of it, while the gate/up gradients form in the memory the
    # saved gate, up and product give back (measured on CPU: bench/plan_vs_measured.py,
    # bench/tiled_mlp_cpu.py), plus the residual stream's gradients and the weight bitsandbytes
    # dequantizes to compute dtype for the matmul.
    biggest = max(fin * fout for fin, fout, _ in s.linears().values())
    workspace = c * (2 * s.intermediate * max(s.expert_top_k, 1) * mlp_tokens + 2 * h * tokens)
    workspace += biggest * c if mode != "none" else 0

    # Logits. The fused frozen head (finetune.memory.lean) holds one chunk of logits in fp32 (+ their
    # compute-dtype form when that is not fp32) and keeps d loss / d hidden for backward; any other
    # head: the fp32 logits, the log-softmax output and its grads, for the whole sequence or one
    # chunk of train.loss_chunk_size tokens (recomputed in backward); measured at fp32 and bf16.
    chunk = min(cfg.train.loss_chunk_size, tokens) if cfg.train.loss_chunk_size > 0 else tokens
    if _fused_head(cfg, targets):
        # + the final norm's output, its trained positions gathered (a copy; the [:, :-1] of more
        # than one row is another) and d loss / d hidden, all hidden-sized
        logits = chunk * V * _upcast(c) + (3 + (rows > 1)) * c * h * tokens
    else:  # a half-precision head's output is freed once upcast (nothing keeps it for backward)
        logits = chunk * V * (8 + 4)
    # The loss's transient peaks at the end of forward, a layer's backward later: they never
    # coexist, so the peak is the kept activations plus the larger of the two.
    backward = recomputed + workspace

    parts = {
        "quantized_weights" if mode != "none" else "base_weights": w_shard // shard + w_repl,
        "unquantized_weights": unquant // shard,
        "lora_params": lora_bytes * n_train // shard * (2 if _reference_adapter(cfg) else 1),
        "lora_grads": lora_bytes * n_train // shard,
        "optimizer_state": opt,
        "fsdp_gather_buffers": (2 * (layer_weight + 2 * n_train // max(L, 1)) if fsdp else 0),
        "activations": kept,
        "logits_loss": logits,
        "backward_workspace": max(backward - logits, 0),
    }
    notes["backward_workspace"] = "beyond the loss's share: a layer's backward" + \
        (" (recomputed)" if cfg.train.gradient_checkpointing else "")
    if fsdp:
        parts["fsdp_gather_buffers"] = max(parts["fsdp_gather_buffers"], embed, head)
        notes["fsdp_gather_buffers"] = "one layer in use + one prefetched, unsharded"
    if s.n_expert:  # expert LoRA, trained routers, unpacked expert stacks (finetune.plan.moe)
        for k, v in moe_parts(cfg, s, c, _opt_bytes).items():
            parts[k] = parts.get(k, 0) + v
    allocated = sum(parts.values())
    parts["cuda_context"] = 0 if on_cpu else CUDA_CONTEXT_BYTES
    parts["allocator_slack"] = int(allocated * slack)
    if _reference_adapter(cfg):
        notes["lora_params"] = "+ model.adapter kept frozen as the reference (same size)"
    if rows > mb:
        notes["activations"] = (f"{cfg.train.objective}: {rows} sequences per micro-batch of {mb}"
                                + (" (+ the reference's forward, under no_grad before the policy's: time, not peak)"
                                   if cfg.train.objective in ("dpo", "kto") else ""))
    if _auto_cpu_unprobed(cfg):
        notes["precision"] = ("auto, counted as fp32: this CPU's bf16 probe has not run yet "
                              "(measure=true or a training run measures it)")
    if cfg.train.compile != "off":  # torch-free here: whether auto compiles is finetune.runtime's call
        notes["compile"] = (f"train.compile={cfg.train.compile}: the compiled layers' workspace (inductor's "
                            "buffers) is not counted")
    if not fsdp and world > 1:
        notes["strategy"] = "ddp: weights, LoRA and optimizer state replicated on every device"
    load = _load_peak(s, cfg, c, w_shard + w_repl, unquant, on_cpu)
    if fsdp:
        notes["strategy"] = (f"fsdp: each device first loads the whole quantized model ({load / GiB:.2f} GiB), "
                             "then shards it; that load must fit one device too")
    return Plan(model=s.name, shape=s, world_size=world,
                strategy=("fsdp" if fsdp else ("ddp" if world > 1 else "single")),
                micro_batch=mb, seq_len=seq, parts=parts, notes=notes, load_peak_bytes=load,
                activations_detail={"with_checkpointing": with_ckpt, "without_checkpointing": without_ckpt,
                                    "one_layer": layer_full, "attention_masks": masks,
                                    "loss_transient": logits, "backward_transient": backward,
                                    **{f"per_token_layer_{k}": v for k, v in per_tok.items()},
                                    **{f"per_tile_token_layer_{k}": v for k, v in per_tile.items()}})


# --------------------------------------------------------------------------- budget search
