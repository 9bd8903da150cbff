"""LoRA branches and modules_to_save copies computing in the compute dtype (finetune.runtime.lora_compute_dtype,
applied by finetune.models.dtypes.trained_in_fp32): at bf16 frozen weights (the CPU probe forced to bf16, what
precision=auto picks on an AVX512-BF16 CPU) the branch matmuls read bf16 inputs while the LoRA weights and their
AdamW state stay fp32; at fp32 frozen weights nothing changes."""

import csv
import os
import subprocess
import sys

import pytest
import torch

from finetune.config import load_config
from finetune.models.load import load_tokenizer
from finetune.runtime import lora_compute_dtype
from finetune.training.build import build_step
from tiny_peft import train_losses


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _cfg(recipe: str = "tiny-lora", **over):
    base = {"output.progress": "false", "lora.dropout": "0.0", "train.optimizer": "adamw", "train.lr": "0.01"}
    return load_config(recipe, {**base, **{k: str(v) for k, v in over.items()}})


def _build(cfg):
    torch.manual_seed(cfg.train.seed)
    return build_step(cfg, "cpu", load_tokenizer(cfg.model))


def _branches(model):
    return [m for n, m in model.named_modules() if n.split(".")[-2:-1] in (["lora_A"], ["lora_B"])]


def _losses(step, steps: int = 6) -> list[float]:
    return train_losses(step, steps)


def test_policy(monkeypatch):
    monkeypatch.setenv("FINETUNE_CPU_PRECISION", "bf16")
    assert lora_compute_dtype(_cfg(), "cpu") == torch.bfloat16
    assert lora_compute_dtype(_cfg("tiny-qlora"), "cpu") == torch.bfloat16
    assert lora_compute_dtype(_cfg(**{"lora.compute_dtype": "float32"}), "cpu") is None
    assert lora_compute_dtype(_cfg(precision="32-true"), "cpu") is None
    monkeypatch.setenv("FINETUNE_CPU_PRECISION", "fp32")
    assert lora_compute_dtype(_cfg(), "cpu") is None
    assert lora_compute_dtype(_cfg(**{"lora.compute_dtype": "bfloat16"}), "cpu") == torch.bfloat16


@pytest.mark.parametrize("recipe", ["tiny-lora", "tiny-qlora"])
def test_bf16_branch_inputs_fp32_weights_and_adamw_state(monkeypatch, recipe):
    if recipe == "tiny-qlora":
        pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("FINETUNE_CPU_PRECISION", "bf16")
    step = _build(_cfg(recipe))
    branches = _branches(step.model)
    assert branches
    seen = set()
    # F.linear is where autocast casts: record the dtypes the matmul itself sees
    real = torch.nn.functional.linear

    def spy(x, w, b=None):
        out = real(x, w, b)
        if w.shape[0] == step.model.peft_config["default"].r or w.shape[1] == step.model.peft_config["default"].r:
            seen.add((x.dtype, out.dtype))
        return out
    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    before = _losses(step, 1)
    assert seen == {(torch.bfloat16, torch.bfloat16)}, seen  # no fp32 upcast of the branch input
    assert {p.dtype for b in branches for p in b.parameters()} == {torch.float32}
    state = [t for s in step.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    assert state and {t.dtype for t in state} == {torch.float32}
    assert all(p.grad is None or p.grad.dtype == torch.float32 for b in branches for p in b.parameters())
    assert before


@pytest.mark.parametrize("recipe", ["tiny-lora", "tiny-qlora"])
def test_bf16_branch_losses_within_2_percent_of_the_fp32_branch(monkeypatch, recipe):
    if recipe == "tiny-qlora":
        pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("FINETUNE_CPU_PRECISION", "bf16")
    ours = _losses(_build(_cfg(recipe)))
    fp32 = _losses(_build(_cfg(recipe, **{"lora.compute_dtype": "float32"})))
    assert ours[-1] < ours[0] - 0.05  # it trains
    for a, b in zip(ours, fp32):
        assert abs(a - b) <= 2e-2 * abs(b), (ours, fp32)


def test_fp32_probe_is_unchanged(monkeypatch):
    monkeypatch.setenv("FINETUNE_CPU_PRECISION", "fp32")
    step = _build(_cfg())
    assert all("forward" not in vars(b) for b in _branches(step.model))  # peft's own forward, untouched
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in step.model.modules())
    auto = _losses(step)
    assert auto == _losses(_build(_cfg(**{"lora.compute_dtype": "float32"})))  # exact


def test_an_adapter_loaded_later_computes_alike(monkeypatch, tmp_path):
    # a preference run continuing from an adapter loads it again, frozen, as its reference
    monkeypatch.setenv("FINETUNE_CPU_PRECISION", "bf16")
    step = _build(_cfg())
    step.model.save_pretrained(tmp_path / "sft")
    step.model.load_adapter(str(tmp_path / "sft"), adapter_name="reference", is_trainable=False)
    step.model.set_adapter("reference", inference_mode=True)
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ref = step.model(input_ids=x).logits
    step.model.set_adapter("default")
    with torch.no_grad():
        assert torch.equal(step.model(input_ids=x).logits, ref)  # the same weights, the same dtypes


def test_modules_to_save_copy_computes_in_bf16_and_trains_in_fp32(monkeypatch):
    monkeypatch.setenv("FINETUNE_CPU_PRECISION", "bf16")
    step = _build(_cfg(**{"lora.modules_to_save": "[lm_head]", "lora.target_modules": "[q_proj,v_proj]"}))
    copy = step.model.base_model.model.lm_head.modules_to_save["default"]
    assert copy.weight.dtype == torch.float32 and copy.weight.requires_grad
    seen = []
    copy.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    losses = _losses(step, 3)
    assert seen and set(seen) == {torch.bfloat16}  # its matmul in bf16, its neighbours' dtype
    assert copy.weight.grad is None and all(x == x for x in losses)
    assert {t.dtype for t in step.optimizer.state[copy.weight].values() if t.numel() > 1} == {torch.float32}


@pytest.mark.slow
@pytest.mark.parametrize("probe", ["bf16", "fp32"])
def test_default_from_the_cli(tmp_path, probe):
    out = tmp_path / "run"
    env = {**os.environ, "FINETUNE_CPU_PRECISION": probe, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "finetune.cli", "recipe=tiny-lora", f"out_dir={out}",
                        "train.max_steps=2", "output.progress=false"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [row for row in csv.DictReader((out / "logs" / "metrics.csv").open()) if row.get("train_loss")]
    assert [int(row["step"]) for row in rows] == [1, 2]


@pytest.mark.parametrize("recipe", ["tiny-lora", "tiny-qlora"])
def test_fsdp_keeps_one_float_dtype_and_the_branch_runs(monkeypatch, recipe):
    # FSDP flattens each unit to one dtype (finetune.models.dtypes.one_float_dtype): the LoRA weights
    # are bf16 there, and the branch's per-forward cast to bf16 changes nothing
    if recipe == "tiny-qlora":
        pytest.importorskip("bitsandbytes")
    from finetune.models.load import load_model

    monkeypatch.setenv("FINETUNE_CPU_PRECISION", "bf16")
    model = load_model(_cfg(recipe, strategy="fsdp"), "cpu")
    assert {p.dtype for p in model.parameters() if type(p).__name__ != "Params4bit"} == {torch.bfloat16}
    model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters() if p.requires_grad)
