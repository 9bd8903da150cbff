"""End to end on the tiny model: LoRA and real NF4 QLoRA, the saved adapter loads with plain peft,
gradient accumulation is exact, and resume reproduces the uninterrupted run."""

import gc
import json
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import finetune
from finetune.config import load_config
from finetune.errors import FinetuneError, UsageError
from finetune.training import build, loop, report
from finetune.training.checkpoint import is_complete
from finetune.training.objectives.sft import CausalLMLoss
from finetune.training.loop import main, make_fabric


def run_in_process(recipe, out_dir, **overrides):
    cfg = load_config(recipe, {"out_dir": str(out_dir), "output.progress": "false",
                               **{k: str(v) for k, v in overrides.items()}})
    fabric = make_fabric(cfg)
    return main(fabric, cfg)


def logits_of(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


PROBE = torch.tensor([[1, 120, 118, 104, 117, 13, 75, 108, 2, 13, 1, 100]])

FRESH_PROCESS_LOGITS = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
adapter = sys.argv[1]
import json; base = json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
ids = torch.tensor([[1, 120, 118, 104, 117, 13, 75, 108, 2, 13, 1, 100]])
with torch.no_grad():
    torch.save(model(input_ids=ids, use_cache=False).logits, sys.argv[2])
"""


@pytest.mark.parametrize("recipe", ["tiny-lora", "tiny-qlora"])
def test_end_to_end_adapter_loads_with_plain_peft(recipe, tmp_path):
    result = run_in_process(recipe, tmp_path / "run", **{"train.max_steps": 4})
    final = tmp_path / "run" / "final"
    for name in ["adapter_config.json", "adapter_model.safetensors", "config.yaml", "tokenizer.json"]:
        assert (final / name).is_file(), name
    assert Path(json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]).is_dir()
    weights = load_file(final / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())
    if recipe == "tiny-qlora":
        import bitsandbytes as bnb  # only the QLoRA case needs it

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in result.model.modules())
        return  # 4-bit base vs fp32 base logits differ by quantization error; the LoRA test covers parity
    expected = logits_of(result.model, PROBE)
    out = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", FRESH_PROCESS_LOGITS, str(final), str(out)], check=True, timeout=300)
    torch.testing.assert_close(torch.load(out), expected, atol=1e-5, rtol=1e-5)


def test_loss_goes_down_and_logs(tmp_path, capsys):
    result = run_in_process("tiny-lora", tmp_path / "run", **{"train.max_steps": 12})
    losses = [l for _, l in result.state.losses]
    assert losses[-1] < losses[0]
    assert (tmp_path / "run" / "logs" / "metrics.csv").is_file()
    assert "peak resident memory (this process):" in capsys.readouterr().out


def test_peak_memory_line_on_a_gpu_names_the_prediction(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: 9 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 8 * 2**30)
    line = report.peak_memory_line(load_config("qlora-7b-alpaca", {}), torch.device("cuda", 0), 2)
    assert line.startswith("peak GPU memory (device 0): 8.00 GiB allocated, ~9.49 GiB with reserve and CUDA context")
    assert "`finetune plan` predicted 6.12 GiB" in line


def _adapter(path):
    return load_file(Path(path) / "adapter_model.safetensors")


def test_gradient_accumulation_equivalence(tmp_path):
    # 4 x micro-batch 1 == 1 x micro-batch 4 on examples of different lengths (no packing), because
    # the loss is normalised by the trained tokens of the whole step, not averaged per micro-batch.
    common = {"train.max_steps": 2, "train.global_batch_size": 4, "data.packing": "false"}
    a = run_in_process("tiny-lora", tmp_path / "a", **common, **{"train.micro_batch_size": 1})
    b = run_in_process("tiny-lora", tmp_path / "b", **common, **{"train.micro_batch_size": 4})
    la, lb = [l for _, l in a.state.losses], [l for _, l in b.state.losses]
    assert la == pytest.approx(lb, rel=1e-5)
    wa, wb = _adapter(a.final_dir), _adapter(b.final_dir)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    cfg = {"train.max_steps": 6, "train.save_every": 2}
    full = run_in_process("tiny-lora", tmp_path / "full", **cfg)
    # A run that stopped after step 4: only its checkpoints exist.
    part = tmp_path / "part"
    part.mkdir()
    for step in (2, 4):
        shutil.copytree(tmp_path / "full" / f"step-{step:06d}", part / f"step-{step:06d}")
    resumed = run_in_process("tiny-lora", part, **cfg, resume="auto")
    assert [l for _, l in resumed.state.losses] == [l for _, l in full.state.losses]
    wf, wr = _adapter(full.final_dir), _adapter(resumed.final_dir)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)


def test_refuses_non_empty_out_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(UsageError, match="holds files finetune did not write: keep.txt"):
        run_in_process("tiny-lora", tmp_path, **{"train.max_steps": 1, "train.warmup_steps": 1})
    assert (tmp_path / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_nan_loss_stops_and_names_step(tmp_path, monkeypatch):
    real_forward = CausalLMLoss.forward
    calls = {"n": 0}

    def poisoned(self, *args):
        calls["n"] += 1
        loss, n = real_forward(self, *args)
        # micro-batch 2 of 2 per step with micro 2 / global 4: step 3 starts at call 5
        return (loss * float("nan"), n) if calls["n"] >= 5 else (loss, n)

    monkeypatch.setattr(CausalLMLoss, "forward", poisoned)
    with pytest.raises(FinetuneError, match="at step 3.*step-000002"):
        run_in_process("tiny-lora", tmp_path / "run", **{"train.max_steps": 6, "train.save_every": 2})
    assert is_complete(tmp_path / "run" / "step-000002")
    assert not (tmp_path / "run" / "final").exists()


def test_unmatched_lora_target_is_one_line_usage_error(tmp_path):
    with pytest.raises(UsageError, match="matched no module"):
        run_in_process("tiny-lora", tmp_path / "run", **{"lora.target_modules": "[nonexistent_proj]"})


def test_micro_batch_auto_asks_the_planner(tmp_path):
    result = run_in_process("tiny-lora", tmp_path / "run", **{"train.max_steps": 1, "train.warmup_steps": 1, "train.micro_batch_size": "auto"})
    assert result.state.step == 1 and (tmp_path / "run" / "final" / "COMPLETE").is_file()


def test_first_step_trains_in_training_mode_with_checkpointing(tmp_path, monkeypatch):
    # from_pretrained returns the base in eval mode, where transformers skips gradient checkpointing
    # and LoRA dropout is off: every training forward, the first included, must see training mode.
    seen = []
    real = CausalLMLoss._forward

    def spy(self, *args):
        if torch.is_grad_enabled():
            layer = self.model.get_base_model().model.layers[0]
            seen.append((layer.training, layer.gradient_checkpointing))
        return real(self, *args)

    monkeypatch.setattr(CausalLMLoss, "_forward", spy)
    run_in_process("tiny-lora", tmp_path / "run", **{"train.max_steps": 2, "train.gradient_checkpointing": "true"})
    assert seen and all(s == (True, True) for s in seen), seen


def test_finetune_train_twice_in_one_process_returns_each_final_dir_and_frees_the_model(tmp_path, monkeypatch):
    # The API is the CLI's `finetune recipe=...`: callable again in the same process (a notebook,
    # a sweep), each call returning its own final adapter, the same seed giving the same adapter,
    # and nothing of the run left alive for what follows (the eval suite loads other models).
    models = []
    real_build = build.build_step

    def remember(*args, **kwargs):
        step = real_build(*args, **kwargs)
        models.append(weakref.ref(step.model))
        return step

    monkeypatch.setattr(loop, "build_step", remember)
    finals = []
    for name in ("a", "b"):
        cfg = finetune.load_config("tiny-lora", {"out_dir": str(tmp_path / name), "train.max_steps": "2",
                                                 "output.progress": "false"})
        finals.append(finetune.train(cfg))
        gc.collect()
        assert models[-1]() is None, "the trained model is still referenced after finetune.train returned"
    assert finals == [tmp_path / "a" / "final", tmp_path / "b" / "final"]
    assert all(is_complete(f) for f in finals)
    wa, wb = _adapter(finals[0]), _adapter(finals[1])
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
