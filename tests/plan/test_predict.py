"""The memory planner: offline, itemised, monotone, and exact where it can be checked on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from finetune.config import load_config
from finetune.errors import UsageError
from finetune.plan.fit import auto_micro_batch, max_micro_batch, max_seq_len
from finetune.plan.predict import GiB, parse_bytes, predict
from finetune.plan.shapes import model_shape

ROOT = Path(__file__).resolve().parents[2]
# The recipes sized for a 12 GB GPU (the CPU ones - demo, tiny-*, moe-* - say accelerator: cpu).
GPU_RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml")
                     if "accelerator: cpu" not in p.read_text())
# recipes whose model is built by finetune first: planned by the shape they will have
UNBUILT = {"moe-8x1b-router": {"model.name": "8xmeta-llama/Llama-3.2-1B"}}


def cfg_of(recipe: str = "qlora-7b-alpaca", **overrides):
    return load_config(recipe, {k.replace("__", "."): str(v) for k, v in overrides.items()})


def weight_bytes(plan) -> int:
    return plan.parts.get("quantized_weights", plan.parts.get("base_weights"))


def test_gpu_recipes_plan_offline_without_torch():
    # A fresh interpreter with the network cut and the hub offline: planning every GPU recipe must
    # neither download anything nor import torch.
    code = textwrap.dedent(f"""
        import socket, sys
        def refuse(*a, **k): raise OSError("network used")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        from finetune.config import load_config
        from finetune.plan.predict import predict
        for r in {GPU_RECIPES!r}:
            p = predict(load_config(r, {UNBUILT!r}.get(r, {{}})))
            assert p.peak_bytes > 2 * 2**30, (r, p.peak_bytes)
        from finetune.cli import run
        assert run(["plan", "recipe=qlora-8b-sharegpt"]) == 0  # the whole command, table and all
        assert "torch" not in sys.modules, "planner imported torch"
        print("ok")
    """)
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout
    assert len(GPU_RECIPES) >= 5


MEASURED_CPU = ROOT / "bench" / "results" / "plan-vs-measured-cpu.json"  # fp32
MEASURED_CPU_BF16 = sorted((ROOT / "bench" / "results").glob("plan-vs-measured-cpu-*.json"))  # auto (bf16 here), ...


@pytest.mark.parametrize("path", [MEASURED_CPU, *MEASURED_CPU_BF16], ids=lambda p: p.stem)
def test_prediction_matches_the_recorded_cpu_measurements(path):
    """Today's planner against peaks measured on real training steps (bench/plan_vs_measured.py,
    SmolLM2-135M; fp32 and, in the -<precision> files, bf16 frozen weights with fp32 LoRA): a
    change to the planner that moves any of them more than 10% from what was measured fails here,
    without rerunning the minutes-long measurement."""
    recorded = json.loads(path.read_text())
    assert len(recorded["rows"]) >= (8 if path == MEASURED_CPU else 2)
    for row in recorded["rows"]:
        precision = {"precision": row["planned_precision"]} if "planned_precision" in row else {}
        plan = predict(load_config("tiny-lora", {**recorded["base"], **row["overrides"], **precision}), slack=0.0)
        predicted = plan.peak_bytes - plan.parts["cuda_context"]
        error = predicted / row["measured_bytes"] - 1
        assert abs(error) <= 0.10, f"{row['config']}: predicted {predicted}, measured {row['measured_bytes']}"
        assert all(v >= 0 for v in plan.parts.values())


def test_known_shapes():
    s = model_shape("meta-llama/Llama-2-7b-hf")
    assert (s.n_layer, s.hidden, s.intermediate, s.vocab, s.tied) == (32, 4096, 11008, 32000, False)
    assert s.n_params() == 6_738_415_616  # Llama-2-7B's published parameter count
    assert model_shape("meta-llama/Llama-3.1-8B").vocab == 128256
    assert model_shape("Qwen/Qwen2.5-3B").tied and model_shape("Qwen/Qwen2.5-3B").qkv_bias
    assert model_shape("mistralai/Mistral-7B-v0.1").n_kv_head == 8
    # the built-in smollm2 alias agrees with litgpt's registry entry
    lit = model_shape("HuggingFaceTB/SmolLM2-135M")
    ali = model_shape("smollm2-135m")
    assert {k: v for k, v in vars(lit).items() if k != "name"} == {k: v for k, v in vars(ali).items() if k != "name"}


def test_nf4_7b_weights_match_bitsandbytes_footprint():
    # ~3.87 GB is the commonly reported 4-bit Llama-2-7B footprint (linears NF4-dq + bf16 embed/head).
    p = predict(cfg_of())
    total = p.parts["quantized_weights"] + p.parts["unquantized_weights"]
    assert 3.8e9 < total < 3.95e9


def test_checkpointing_reduces_activations():
    on = predict(cfg_of(train__gradient_checkpointing="true"))
    off = predict(cfg_of(train__gradient_checkpointing="false"))
    assert on.parts["activations"] * 5 < off.parts["activations"]
    assert on.activations_detail["without_checkpointing"] == off.parts["activations"]


def test_chunked_loss_reduces_logits():
    chunked = predict(cfg_of(train__loss_chunk_size=256))
    plain = predict(cfg_of(train__loss_chunk_size=0))
    s, tokens = plain.shape, 2 * 1024
    # bf16: the fused frozen head holds one chunk of fp32 logits + their bf16 form and three
    # hidden-sized tensors (norm output, trained positions, d loss/d hidden; micro-batch 2 adds the
    # copy [:, :-1] makes); the plain loss holds every position's fp32 logits, log-softmax and grads
    # (the bf16 logits are freed once upcast: measured at bf16 on the CPU, bench/plan_vs_measured.py).
    assert chunked.parts["logits_loss"] == 256 * s.vocab * (4 + 2) + 4 * 2 * s.hidden * tokens
    assert plain.parts["logits_loss"] == tokens * s.vocab * (4 + 8)
    trained_head = predict(cfg_of(train__loss_chunk_size=256, lora__target_modules="[q_proj,v_proj,lm_head]"))
    assert trained_head.parts["logits_loss"] == 256 * s.vocab * (4 + 8)  # chunk recomputed in backward


def test_weight_bytes_nf4_lt_int8_lt_none():
    nf4, int8, none = (weight_bytes(predict(cfg_of(quant__mode=m))) for m in ("nf4", "int8", "none"))
    assert nf4 < int8 < none
    no_dq = weight_bytes(predict(cfg_of(quant__double_quant="false")))
    assert nf4 < no_dq


def test_fsdp_shards_ddp_replicates():
    single = predict(cfg_of())
    ddp = predict(cfg_of(devices=4, strategy="ddp"))
    fsdp = predict(cfg_of(devices=4, strategy="fsdp"))
    assert weight_bytes(ddp) == weight_bytes(single)
    assert weight_bytes(fsdp) < weight_bytes(single) / 3  # packed weights / 4 + replicated absmax
    # sharded 4 ways, and in the compute dtype (bf16) rather than fp32: FSDP needs one dtype per unit
    assert fsdp.parts["lora_params"] == single.parts["lora_params"] // 4 // 2
    assert "first loads the whole quantized model" in fsdp.notes["strategy"]
    assert fsdp.parts["fsdp_gather_buffers"] > 0 and ddp.parts["fsdp_gather_buffers"] == 0
    assert fsdp.peak_bytes < ddp.peak_bytes


def test_unknown_model_suggests():
    with pytest.raises(UsageError, match=r"unknown model 'meta-llama/Llama-2-7b'.*did you mean.*Llama-2-7b"):
        model_shape("meta-llama/Llama-2-7b")
    with pytest.raises(UsageError, match="unknown model"):
        predict(cfg_of(model__name="nobody/NoSuchModel-9000"))


def test_usage_errors():
    with pytest.raises(UsageError, match="gpu_memory"):
        parse_bytes("twelve")
    with pytest.raises(UsageError, match="target_modules"):
        predict(cfg_of(lora__target_modules="[q_porj]"))


def test_parse_bytes():
    assert parse_bytes("12GiB") == 12 * GiB
    assert parse_bytes("24GB") == 24 * 10**9
    assert parse_bytes("16000MiB") == 16000 * 2**20
    assert parse_bytes("1e9") == 10**9


def test_budget_search_monotone():
    cfg = cfg_of()
    peaks = [predict(cfg, b).peak_bytes for b in (1, 2, 4, 8)]
    assert peaks == sorted(peaks)
    seq_peaks = [predict(cfg, 1, s).peak_bytes for s in (256, 1024, 4096)]
    assert seq_peaks == sorted(seq_peaks)
    mbs = [max_micro_batch(cfg, g * GiB) for g in (4, 8, 12, 24, 48)]
    assert mbs == sorted(mbs) and mbs[0] == 0 and mbs[-1] > mbs[2]
    seqs = [max_seq_len(cfg, g * GiB) for g in (8, 12, 24)]
    assert seqs == sorted(seqs) and seqs[0] > 0
    # what the search returns fits, and one more does not
    b = max_micro_batch(cfg, 12 * GiB)
    assert predict(cfg, b).peak_bytes <= 12 * GiB < predict(cfg, b + 1).peak_bytes


def test_auto_micro_batch():
    cfg = cfg_of()  # global batch 16 on 1 device
    mb = auto_micro_batch(cfg, 12 * GiB)
    assert 1 <= mb <= max_micro_batch(cfg, 12 * GiB) and 16 % mb == 0
    assert auto_micro_batch(cfg, 1 * GiB) == 1  # nothing fits: still a usable number
    cpu = cfg_of("tiny-lora")
    assert 1 <= auto_micro_batch(cpu, 64 * GiB) <= 8 and cpu.train.global_batch_size % auto_micro_batch(cpu, 64 * GiB) == 0


def test_tiny_checkpoint_bytes_exact():
    # Fast check against the saved tiny checkpoint: every tensor's bytes, and the LoRA shapes peft
    # would create (A: r x in, B: out x r) for each 2-D block weight.
    from safetensors import safe_open

    from finetune.models.tiny import tiny_model_dir

    cfg = cfg_of("tiny-lora")
    plan = predict(cfg)
    base = lora = 0
    with safe_open(str(tiny_model_dir() / "model.safetensors"), framework="numpy") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            base += t.nbytes
            if ".layers." in name and t.ndim == 2:
                out_f, in_f = t.shape
                lora += 4 * cfg.lora.r * (in_f + out_f)
    assert plan.parts["base_weights"] + plan.parts["unquantized_weights"] == base
    assert plan.parts["lora_params"] == lora


@pytest.mark.slow
def test_tiny_model_bytes_exact():
    # The real tiny Llama with peft LoRA on all linear layers: parameter bytes match exactly.
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.models.tiny import tiny_model_dir

    cfg = cfg_of("tiny-lora")
    plan = predict(cfg)
    assert model_shape(str(tiny_model_dir())) == model_shape("tiny").__class__(
        **{**vars(model_shape("tiny")), "name": str(tiny_model_dir())})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                             target_modules="all-linear", lora_dropout=0.0))
    lora = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    base = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
    assert plan.parts["lora_params"] == lora
    assert plan.parts["base_weights"] + plan.parts["unquantized_weights"] == base
    assert plan.parts["cuda_context"] == 0  # accelerator=cpu


def test_nf4_bytes_exact_against_bitsandbytes():
    torch = pytest.importorskip("torch")
    F = pytest.importorskip("bitsandbytes.functional")
    from finetune.plan.predict import _quant_bytes

    w = torch.randn(128, 64)
    for dq in (True, False):
        q, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
        real = [q, qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code, qs.offset.reshape(1)] if dq else [])
        assert sum(_quant_bytes(w.numel(), 128, "nf4", dq, 2)) == sum(t.numel() * t.element_size() for t in real)


LONG = dict(train__offload_activations="true", lora__dropout=0, train__loss_chunk_size=256,
            model__attn_implementation="flash_attention_2")


def test_mlp_tiling_raises_the_longest_8b_sequence():
    plain = cfg_of("qlora-8b-sharegpt", **LONG)
    tiles = cfg_of("qlora-8b-sharegpt", **LONG, train__mlp_tile_size=2048)
    assert max_seq_len(plain, 12 * GiB) < 24576 <= max_seq_len(tiles, 12 * GiB)
    a, b = predict(plain, 1, 24576), predict(tiles, 1, 24576)
    changed = {k for k in a.parts if a.parts[k] != b.parts[k]}
    # under checkpointing the one layer being recomputed (its MLP now one tile) is backward's transient
    assert changed == {"backward_workspace", "allocator_slack"}
    assert a.activations_detail["one_layer"] > b.activations_detail["one_layer"]
    # the MLP's backward workspace (2 x 14336 bf16 per token) for one tile, not all 24576 tokens
    da, db = a.activations_detail, b.activations_detail
    assert (da["backward_transient"] - db["backward_transient"]
            == 2 * 2 * 14336 * (24576 - 2048) + da["one_layer"] - db["one_layer"])
    # gate and up (2 with finetune.lean), down's input and the three LoRA A outputs (r=16), for one
    # tile; the tile inputs (the MLP's input, which the LoRA branches of gate/up keep anyway without
    # dropout) stay per token
    detail = b.activations_detail
    assert detail["per_token_layer_mlp"] == 0 and detail["per_tile_token_layer_mlp"] == 3 * 2 * 14336
    assert da["one_layer"] - db["one_layer"] == (3 * 2 * 14336 + 3 * 2 * 16) * (24576 - 2048)


def test_mlp_tiling_changes_nothing_for_a_micro_batch_of_one_tile():
    for seq, mb in ((2048, 1), (1024, 2)):
        plain = predict(cfg_of("qlora-8b-sharegpt", **LONG), mb, seq)
        tiles = predict(cfg_of("qlora-8b-sharegpt", **LONG, train__mlp_tile_size=2048), mb, seq)
        assert tiles.parts == plain.parts and tiles.activations_detail == plain.activations_detail
    moe = cfg_of("qlora-8b-sharegpt", model__name="mistralai/Mixtral-8x7B-v0.1", data__seq_len=8192)
    moe_tiles = cfg_of("qlora-8b-sharegpt", model__name="mistralai/Mixtral-8x7B-v0.1", data__seq_len=8192,
                       train__mlp_tile_size=1024)
    assert predict(moe_tiles).parts == predict(moe).parts  # MoE blocks are not tiled


def _lora_per_token(**overrides) -> int:
    cfg = load_config("tiny-lora", {"model.name": "smollm2-135m", "lora.target_modules": "[all-linear]",
                                    "lora.dropout": "0", "lora.r": "16", **overrides})
    return predict(cfg, 1, 512).activations_detail["per_token_layer_lora"]


def test_bf16_counts_each_lora_branch_own_fp32_copy_of_its_input():
    """peft's fp32 branch (lora.compute_dtype=float32) casts a LoRA branch's input to its fp32
    weights: on a bf16 base every branch keeps its own fp32 copy (7 per layer, q/k/v each one),
    measured on the real step; at fp32 the branches share the layer's input; under GPU autocast
    bitsandbytes' layers skip the cast (shared) and plain Linear's is cast back (a bf16 copy)."""
    h, i, r = 576, 1536, 16  # SmolLM2-135M
    fp32 = {"lora.compute_dtype": "float32"}
    assert _lora_per_token(accelerator="cpu", precision="bf16-true", **fp32) == 4 * (6 * h + i) + 7 * 4 * r
    assert _lora_per_token(accelerator="cpu", precision="32-true", **fp32) == 7 * 4 * r
    assert _lora_per_token(accelerator="cuda", precision="bf16-mixed", **{"quant.mode": "nf4"}, **fp32) == 7 * 2 * r
    assert _lora_per_token(accelerator="cuda", precision="bf16-mixed", **fp32) == 2 * (6 * h + i) + 7 * 2 * r


def test_the_default_bf16_branch_reads_its_input_as_it_is():
    """lora.compute_dtype=auto next to bf16 frozen weights (the default on a bf16 CPU and on a GPU):
    the branches compute in bf16 on the layer's bf16 input, no copy; lora_A's output is bf16. At
    fp32 frozen weights auto is peft's branch; an explicit bf16 branch there casts its fp32 input."""
    h, i, r = 576, 1536, 16
    for acc, precision in (("cpu", "bf16-true"), ("cuda", "bf16-mixed")):
        assert _lora_per_token(accelerator=acc, precision=precision) == 7 * 2 * r
        assert _lora_per_token(accelerator=acc, precision=precision, **{"quant.mode": "nf4"}) == 7 * 2 * r
    assert _lora_per_token(accelerator="cpu", precision="32-true") == 7 * 4 * r
    assert _lora_per_token(accelerator="cpu", precision="32-true", **{"lora.compute_dtype": "bfloat16"}) == \
        2 * (6 * h + i) + 7 * 2 * r


def test_load_peak_is_predicted_and_a_moe_packs_one_expert_stack_at_a_time():
    dense = predict(load_config("qlora-7b-alpaca", {}))
    weights = sum(dense.parts[k] for k in ("quantized_weights", "unquantized_weights"))
    assert weights < dense.load_peak_bytes < weights + 1 * GiB  # + context + one bf16 weight
    for experts in (8, 16):
        name = f"{experts}xmeta-llama/Llama-3.2-1B"
        # On a GPU the MoE loads on the CPU and each fused stack is packed onto the device alone
        # (finetune.models.load): the experts packed + the largest stack unpacked (gate_up_proj:
        # E x 2 x 8192 x 2048 bf16) or the whole packed model, whichever is larger, + context.
        moe = predict(load_config("qlora-7b-alpaca", {"model.name": name, "quant.double_quant": False}))
        weights = moe.parts["quantized_weights"] + moe.parts["unquantized_weights"]
        experts_packed = 16 * 3 * experts * (8192 * 2048 // 2 + 4 * 8192 * 2048 // 64 + 64)
        stack = experts * 2 * 8192 * 2048 * 2
        assert moe.load_peak_bytes == max(experts_packed + stack, weights) + moe.parts["cuda_context"]
        assert moe.load_peak_bytes < moe.peak_bytes
    assert experts_packed + stack > weights  # 16 experts: the stack being packed is the peak
    # On the CPU it loads where it runs: all 8 x 1B stacks unpacked (12.9 GB) before packing
    cpu = predict(load_config("qlora-7b-alpaca", {"model.name": "8xmeta-llama/Llama-3.2-1B", "accelerator": "cpu"}))
    assert cpu.load_peak_bytes > 12 * GiB > cpu.peak_bytes


def test_kernel_choices_are_counted(monkeypatch):
    """What auto's choices keep per token per layer, 7B QLoRA packed at 2048 on a GPU: flash
    attention's varlen path drops sdpa's per-layer float copy of the dense mask (2048 bf16 keys per
    token); Liger's RMSNorm keeps its bf16 input instead of an fp32 upcast; Liger's SwiGLU, like
    lean's, keeps gate and up only. auto follows what is installed (finetune.kernels)."""
    from finetune import kernels

    def per_token(**overrides):
        return predict(cfg_of(**overrides), 1, 2048).activations_detail

    h, i, seq = 4096, 11008, 2048
    monkeypatch.setattr(kernels, "installed", lambda module: False)
    sdpa = per_token()
    assert sdpa == per_token(model__attn_implementation="sdpa", train__liger="false")
    flash = per_token(model__attn_implementation="flash_attention_2")
    assert sdpa["per_token_layer_attention"] - flash["per_token_layer_attention"] == 2 * seq
    liger = per_token(train__liger="true")
    assert sdpa["per_token_layer_norms"] - liger["per_token_layer_norms"] == 2 * (4 * h - 2 * h)
    assert liger["per_token_layer_mlp"] == sdpa["per_token_layer_mlp"]  # lean's two tensors, or Liger's
    plain = per_token(train__lean_activations="false")
    assert plain["per_token_layer_mlp"] - sdpa["per_token_layer_mlp"] == 2 * i
    assert per_token(train__lean_activations="false", train__liger="true")["per_token_layer_mlp"] == \
        sdpa["per_token_layer_mlp"]
    monkeypatch.setattr(kernels, "installed", lambda module: True)  # flash-attn and liger-kernel there
    auto = per_token()
    assert auto["per_token_layer_attention"] == flash["per_token_layer_attention"]
    assert auto["per_token_layer_norms"] == liger["per_token_layer_norms"]
    # on the CPU auto is the lean sdpa attention and no Liger, installed or not
    cpu = predict(cfg_of("tiny-lora", accelerator="cpu"), 1, 64)
    assert cpu.activations_detail == predict(cfg_of("tiny-lora", accelerator="cpu", train__liger="false",
                                                    model__attn_implementation="sdpa"), 1, 64).activations_detail
