"""The one typed config: a recipe YAML is a serialized `Config`; `key=value` overrides patch it.

Field docstrings are what `finetune --help` prints, so they are written for users. Parsing, type
checking and the one-line messages are finetune.typed's (the same for every settings file); this
module holds the settings, recipe lookup and the checks across settings (`validate`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from finetune.data.formats import ROLES, Format
from finetune.errors import UsageError
from finetune.ranges import ranged
from finetune.resources import find_resource, read_yaml_mapping
from finetune.typed import instantiate, items, parse_args, read_mapping

# Sequences per optimizer step: beyond this, accumulation runs to millions of micro-batches per step
# (a typo'd 10**7), which no fine-tune wants; pretraining-scale batches stay far below it.
MAX_GLOBAL_BATCH = 65536


@dataclass
class ModelConfig:
    """model.*: the base checkpoint and how transformers loads it."""

    name: str = "tiny"
    """Hub id (e.g. meta-llama/Llama-2-7b-hf), a local directory, or an alias: 'tiny' (random
    tiny Llama for tests) or 'smollm2-135m' (the embedded demo default)."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) when `name` is a hub id."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off unless you trust its author."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = "auto"
    """Attention kernel passed to transformers: auto (on a CUDA GPU flash_attention_2 where
    flash-attn is installed, which runs packed rows as variable-length sequences with no mask,
    else sdpa; on the CPU sdpa), sdpa, eager, flash_attention_2 or flex_attention (GPU training:
    torch has no flex backward on the CPU)."""
    adapter: Optional[str] = None
    """A LoRA adapter directory (e.g. an SFT run's final/) to continue training from: the trained
    adapter starts as it (its LoRA shape; lora.r and lora.alpha must match it), and dpo/kto keep it,
    frozen, as their reference policy instead of the bare base."""


@dataclass
class QuantConfig:
    """quant.*: how the frozen base weights are stored."""

    mode: Literal["none", "nf4", "int8"] = "none"
    """Base-weight quantization with bitsandbytes: none (LoRA), nf4 (QLoRA) or int8."""
    double_quant: bool = True
    """NF4 only: quantize the quantization constants too (saves ~0.4 bit/param)."""
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype the 4-bit layers compute in; auto = bfloat16 on GPU, float32 on CPU."""
    storage_dtype: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = "auto"
    """Dtype the packed 4-bit weights are stored in; auto = the compute dtype under FSDP
    (so they can be sharded), else uint8."""


@dataclass
class LoraConfig:
    """lora.*: the trained adapter."""

    r: int = ranged(16, ge=1)
    """LoRA rank."""
    alpha: int = ranged(32, gt=0, hint="(0 would train an adapter that changes nothing)")
    """LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)."""
    dropout: float = ranged(0.05, ge=0, lt=1)
    """Dropout on the LoRA input. 0 makes runs on different device counts comparable exactly."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt, e.g. [q_proj,v_proj], or [all-linear] for every linear layer but the head."""
    use_rslora: bool = False
    """Rank-stabilised LoRA scaling (peft)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (peft DoRA)."""
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype the LoRA branches and modules_to_save copies compute in; their weights and optimizer
    state stay fp32 either way. auto = the compute dtype where the frozen weights are half precision
    (bf16 at precision=auto on a bf16 CPU and on a GPU), else fp32; float32 = peft's fp32 branch
    (input upcast to the fp32 LoRA weights). DoRA layers always compute as peft does."""
    modules_to_save: list[str] = field(default_factory=list)
    """Extra modules trained in full and saved with the adapter (e.g. [lm_head])."""
    target_parameters: list[str] = field(default_factory=list)
    """Parameters (not modules) to adapt with peft's target_parameters, e.g. the fused MoE expert
    weights [mlp.experts.gate_up_proj,mlp.experts.down_proj]; target_modules may then be []."""


@dataclass
class DataSource:
    """One entry of data.sources: a data set with its own reading and rendering settings
    (finetune.data.mix mixes them); unset fields take data.*'s value."""

    card: Optional[str] = None
    """Dataset card name or path."""
    path: Optional[str] = None
    """A hub id, or a local json/jsonl/parquet/csv file or folder (overrides the card's source)."""
    format: Optional[Format] = None
    """Row format (default: the card's)."""
    split: str = "train"
    """Split to read."""
    data_files: Optional[Union[str, list[str]]] = None
    """Files (or globs) to read instead of matching the split."""
    columns: dict[str, str] = field(default_factory=dict)
    """Column renames for this source."""
    roles: dict[str, str] = field(default_factory=dict)
    """Extra role-name mappings for this source (sharegpt)."""
    system_prompt: Optional[str] = None
    """System prompt for this source's conversations that have none (default: data.system_prompt)."""
    prompt_style: Optional[str] = None
    """Prompt style for this source (default: data.prompt_style)."""
    train_on_prompt: Optional[bool] = None
    """Train on every token of this source (default: data.train_on_prompt)."""
    max_rows: Optional[int] = ranged(None, ge=1, hint="(null = every row)")
    """Use at most this many rows of this source."""
    weight: float = ranged(1.0, gt=0)
    """Share of the mix (weights are normalised): data.mix=weight draws this source's share of the
    training examples, repeating a small source, subsampling a large one."""


@dataclass
class DataConfig:
    """data.*: where the rows come from and how they become token sequences."""

    card: Optional[str] = None
    """Dataset card: a name from datasets/ (e.g. alpaca-cleaned) or a path to a card YAML."""
    path: Optional[str] = None
    """Data source overriding the card's: a hub id, or a local json/jsonl/parquet/csv file or folder."""
    format: Optional[Format] = None
    """Row format: alpaca, sharegpt, messages, text or prompt_completion (default: the card's)."""
    split: str = "train"
    """Split to read from a hub dataset or folder (folder files are matched as `datasets` does)."""
    data_files: Optional[Union[str, list[str]]] = None
    """Files (or globs) to read from a folder or hub dataset, instead of matching the split."""
    subset: Optional[str] = None
    """Hub dataset configuration (subset) name."""
    revision: Optional[str] = None
    """Hub dataset revision."""
    val_path: Optional[str] = None
    """Separate validation file; otherwise `val_fraction` of the rows are held out."""
    val_fraction: float = ranged(0.05, ge=0, lt=1)
    """Fraction of rows held out for validation loss when no `val_path` is given."""
    max_rows: Optional[int] = ranged(None, ge=1, hint="(null = every row)")
    """Use at most this many rows (after shuffling)."""
    seq_len: int = ranged(512, ge=8)
    """Maximum tokens per training sequence (and per pack)."""
    packing: bool = True
    """Best-fit pack examples into seq_len blocks; attention never crosses examples."""
    train_on_prompt: bool = False
    """Train on every token, not only the assistant turns."""
    truncation: Literal["truncate", "drop"] = "truncate"
    """What to do with an example longer than seq_len (always counted)."""
    strict: bool = False
    """Stop at the first malformed row (naming file, row and field) instead of dropping it."""
    prompt_style: str = "auto"
    """Fallback prompt style for tokenizers without a chat template: auto (use the template,
    else alpaca), chatml, alpaca, or a litgpt prompt style name."""
    chat_template: Optional[str] = None
    """Chat template replacing the tokenizer's: a jinja file, chatml, or one of the tokenizer's
    named templates; saved with the adapter's tokenizer."""
    system_prompt: Optional[str] = None
    """System prompt added to every conversation that has none."""
    columns: dict[str, str] = field(default_factory=dict)
    """Column renames, e.g. {instruction: question, output: answer}."""
    roles: dict[str, str] = field(default_factory=dict)
    """Extra role-name mappings for sharegpt, e.g. {bot: assistant}."""
    cache: bool = True
    """Cache the tokenized dataset (keyed by data, tokenizer and these settings)."""
    num_proc: Optional[int] = ranged(None, ge=1, hint="(null = all cores)")
    """Processes for tokenization (default: all cores)."""
    sources: list[DataSource] = items("data.sources[{i}]")
    """Several data sets in one run, instead of card/path: [{card: alpaca-cleaned, weight: 0.7},
    {path: my.jsonl, format: sharegpt, weight: 0.3}] (each cached and counted on its own)."""
    mix: Literal["weight", "concat"] = "weight"
    """How data.sources combine: weight (each source's share of the examples is its weight) or
    concat (every example of every source, once)."""


@dataclass
class TrainConfig:
    """train.*: optimisation, memory savers, checkpoints and logging cadence."""

    max_steps: int = ranged(100, ge=1)
    """Optimizer steps to run."""
    micro_batch_size: Union[int, Literal["auto"]] = ranged(1, ge=1, hint="(or auto)")
    """Sequences per forward pass per device; auto = the largest the planner fits in memory."""
    global_batch_size: int = ranged(8, ge=1, le=MAX_GLOBAL_BATCH)
    """Sequences per optimizer step over all devices; gradient accumulation fills the gap."""
    lr: float = ranged(2e-4, gt=0, le=1)
    """Peak learning rate."""
    min_lr_ratio: float = ranged(0.1, ge=0, le=1)
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = ranged(10, ge=0)
    """Linear warmup steps."""
    weight_decay: float = ranged(0.0, ge=0)
    """Decoupled weight decay."""
    max_grad_norm: float = ranged(1.0, ge=0, hint="(0 disables clipping)")
    """Gradient clipping norm (0 disables)."""
    optimizer: Literal["paged_adamw_8bit", "adamw_8bit", "paged_adamw", "adamw"] = "paged_adamw_8bit"
    """Optimizer: bitsandbytes paged/8-bit AdamW variants, or torch AdamW."""
    seed: int = ranged(42, ge=0, le=2**32 - 1)
    """Seed for everything: init, data order, dropout."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward (non-reentrant) to save memory."""
    loss_chunk_size: int = ranged(1024, ge=0, hint="(0 = plain loss)")
    """Compute lm_head + cross-entropy this many tokens at a time, so full fp32 logits never
    exist at once (0 = plain loss)."""
    offload_activations: bool = False
    """Keep saved activations in CPU RAM during the forward pass (GPU only)."""
    lean_activations: bool = True
    """Save less for backward, same gradients: SwiGLU MLPs keep gate and up but not silu(gate)
    (recomputed in backward), and sdpa attention on the CPU keeps k/v unrepeated and one mask for
    all layers. Applies only to modules of the standard form; others keep their own forward."""
    mlp_tile_size: int = ranged(0, ge=0, hint="(0 = off)")
    """Run each decoder MLP over the sequence this many tokens at a time, every tile under
    activation checkpointing: only one tile's MLP intermediates (gate/up outputs, 3.5x the hidden
    size on Llama) and their gradients exist at once, with the same results. For long sequences,
    where `finetune plan` shows activations and backward workspace dominating (e.g. 2048 for 16k+
    tokens); it costs one extra MLP forward per layer in backward. 0 = off; a micro-batch of at
    most this many tokens runs untiled. Dense MLPs only: MoE blocks keep their own forward."""
    fixed_mmap_threshold: bool = True
    """CPU with glibc: fix malloc's mmap threshold at 32 MiB (with glibc's dynamic one the heap
    fragmented more: ~8% more peak RSS measured). Not applied if MALLOC_MMAP_THRESHOLD_ is set."""
    liger: Union[bool, Literal["auto"]] = "auto"
    """Liger's Triton kernels (RMSNorm, SwiGLU, RoPE): auto (on on a CUDA GPU where liger-kernel
    is installed, off on the CPU), true (GPU only) or false."""
    compile: Union[bool, Literal["off", "layers", "auto"]] = "auto"
    """torch.compile the step: layers = each decoder layer compiled on its own (regional compile:
    one graph reused by every layer; Triton kernels on a GPU, C++/OpenMP on a CPU), after the
    memory features; auto = layers on a GPU, off on a CPU (finetune.runtime.compile_layers);
    off = eager. The first steps (and the first validation) compile: the log and metrics.csv
    report their seconds (compile_s, excluded from tokens/s) and graph breaks."""
    router_aux_loss_coef: float = ranged(0.0, ge=0)
    """MoE (Mixtral) models: weight of the load-balancing loss on router probabilities (0 = off)."""
    save_every: int = ranged(0, ge=0, hint="(0 = only the final adapter)")
    """Save a resumable checkpoint every N steps (0 = only the final adapter)."""
    keep_last: Optional[int] = ranged(None, ge=1, hint="(null keeps every checkpoint)")
    """Keep only the N most recent step checkpoints."""
    eval_every: int = ranged(0, ge=0, hint="(0 = only at the end)")
    """Validation loss every N steps (0 = only at the end)."""
    eval_batches: int = ranged(20, ge=0, hint="(0 = no validation)")
    """Validation micro-batches per evaluation."""
    log_every: int = ranged(1, ge=1)
    """Log metrics every N steps."""
    objective: Literal["sft", "dpo", "orpo", "simpo", "kto"] = "sft"
    """Training objective: sft (supervised, on conversations), or preference tuning on pairs:
    dpo, orpo, simpo; kto on unpaired feedback (settings under pref.*, see docs/preference.md)."""


@dataclass
class PrefConfig:
    """pref.*: preference-tuning settings (train.objective=dpo|orpo|simpo|kto)."""

    beta: float = ranged(0.1, gt=0)
    """Strength of the preference term: DPO/KTO's KL weight, SimPO's reward scale, ORPO's odds-ratio weight (lambda)."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """DPO variant: sigmoid (the paper's), ipo, hinge, robust (with label_smoothing)."""
    label_smoothing: float = ranged(0.0, ge=0, lt=0.5)
    """DPO/SimPO: assumed probability that a pair's labels are flipped (conservative / robust DPO)."""
    simpo_gamma: float = ranged(0.5, ge=0)
    """SimPO: target reward margin (gamma) between chosen and rejected."""
    desirable_weight: float = ranged(1.0, gt=0)
    """KTO: weight of desirable (label true) examples."""
    undesirable_weight: float = ranged(1.0, gt=0)
    """KTO: weight of undesirable (label false) examples."""
    precompute_reference: bool = False
    """DPO: compute the reference log-probs of every pair in one no_grad pass before training and
    keep them with the units, so training runs no reference forward (the pass costs one forward
    per pair; kept in memory, two floats per pair)."""


@dataclass
class EvalConfig:
    """eval.*: the suite scored on the adapter after training."""

    suite: Optional[str] = None
    """Eval suite (name from eval/ or a path) scored on the final adapter after training."""
    max_new_tokens: int = ranged(64, ge=1)
    """Generation length for the suite's generation tasks."""


@dataclass
class OutputConfig:
    """output.*: what a run reports besides checkpoints."""

    loggers: list[Literal["csv", "tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["csv"])
    """Fabric loggers: csv, tensorboard, wandb, mlflow (the last three are extras:
    pip install -e '.[tensorboard]' in the checkout, etc.). All but csv also record the resolved config."""
    project: str = "finetune"
    """W&B project / MLflow experiment the run is logged under."""
    run_name: Optional[str] = None
    """Run name shown by W&B and MLflow; default: the out_dir's name."""
    plot: bool = True
    """Write loss.png (the loss curve) to out_dir at the end."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class Config:
    """A recipe: every setting of a training run."""

    description: str = ""
    """One line saying what this recipe trains (shown by `finetune recipes`)."""
    out_dir: str = "out/run"
    """Where checkpoints, logs and the final adapter go."""
    resume: Union[bool, str] = "no"
    """no (also false), auto (latest complete checkpoint in out_dir; also yes/true), or a checkpoint directory."""
    overwrite: bool = False
    """Start a new run in a non-empty out_dir: the earlier run there is moved aside to a sibling
    OUT.replaced-TIME folder (nothing is deleted)."""
    resume_changed_data: bool = False
    """Resume although the training data's files (or hub revision) changed since the checkpoint was
    saved; by default such a resume is refused."""
    accelerator: Literal["auto", "cpu", "cuda", "gpu", "mps"] = "auto"
    """Fabric accelerator: auto (cuda when available, else cpu), cpu, cuda (or gpu), mps."""
    devices: int = ranged(1, ge=1)
    """Devices (processes) per node."""
    num_nodes: int = ranged(1, ge=1)
    """Number of nodes."""
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """Fabric strategy: auto, ddp, fsdp (shards weights, 4-bit too, over >= 2 processes; needs
    train.optimizer=adamw). See docs/scale-out.md."""
    precision: Optional[Literal["auto", "32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true"]] = "auto"
    """Fabric precision. auto (or null): bf16-mixed on GPU; on CPU frozen weights in bf16 where a
    short probe measures bf16 faster on this CPU, else fp32 (LoRA weights fp32 either way).
    bf16-true / 16-true: frozen weights in that type, LoRA weights and their optimizer state fp32."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pref: PrefConfig = field(default_factory=PrefConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


def load_config(recipe: Optional[str], overrides: dict[str, Any]) -> Config:
    """Recipe YAML (if any) + key=value overrides (strings, as typed) -> validated Config."""
    base = None
    if recipe:
        path = find_resource("recipes", recipe)
        base = read_mapping(Config, read_yaml_mapping(path, "recipe"), f"recipe {path}")
    cfg = instantiate(Config, parse_args(Config, overrides, "command line", base))
    validate(cfg)
    return cfg


RESUME_WORDS = {"no": "no", "false": "no", "off": "no", "auto": "auto", "yes": "auto", "true": "auto", "on": "auto"}


def check_data_sources(data: DataConfig) -> None:
    """data.sources and data.card/data.path contradict each other; each source names its data."""
    if data.sources and (data.card or data.path):
        given = "data.card" if data.card else "data.path"
        raise UsageError(f"data.sources replaces data.card and data.path, but {given} is set too; "
                         f"set {given}=null or move it into data.sources")
    for i, s in enumerate(data.sources):
        if not (s.card or s.path):
            raise UsageError(f"data.sources[{i}]: give card: NAME or path: FILE")


def validate(cfg: Config) -> None:
    """Cross-field checks jsonargparse cannot express (single-field ranges are `ranged` fields)."""
    check_data_sources(cfg.data)
    # YAML reads no/yes/true/false (recipe files and key=value alike) as booleans: the words mean no / auto.
    if isinstance(cfg.resume, bool) or str(cfg.resume).lower() in RESUME_WORDS:
        cfg.resume = RESUME_WORDS[str(cfg.resume).lower()]
    if isinstance(cfg.train.compile, bool):  # YAML reads off/on as booleans
        cfg.train.compile = "layers" if cfg.train.compile else "off"
    for key in ("target_modules", "modules_to_save"):
        if any(not str(name).strip() for name in getattr(cfg.lora, key)):
            raise UsageError(f"lora.{key} has an empty module name: {getattr(cfg.lora, key)}")
    bad_role = next((f"{k}: {v}" for k, v in cfg.data.roles.items() if v not in ROLES), None)
    if bad_role:
        raise UsageError(f"data.roles maps to a role that does not exist ({bad_role}); roles are {', '.join(ROLES)}")
    if not cfg.out_dir.strip():
        raise UsageError("out_dir is empty: give the directory the run writes to, e.g. out_dir=out/my-run")
    if cfg.resume not in ("no", "auto") and not (str(cfg.resume).strip() and Path(cfg.resume).is_dir()):
        raise UsageError(f"resume: expected no, auto or a checkpoint directory, got '{cfg.resume}'")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def gradient_accumulation(cfg: Config, world_size: int, micro_batch_size: int) -> int:
    """Per-device accumulation steps that keep the recipe's global batch on `world_size` devices."""
    per_step = micro_batch_size * world_size
    if cfg.train.global_batch_size % per_step:
        raise UsageError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by "
            f"micro_batch_size {micro_batch_size} x {world_size} device(s)")
    return cfg.train.global_batch_size // per_step
