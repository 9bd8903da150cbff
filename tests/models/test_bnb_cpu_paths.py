"""NF4 on every CPU: both bitsandbytes CPU paths, whatever this machine has.

On CPUs with AVX512-BF16 (Sapphire Rapids class) bitsandbytes marks each Linear4bit for a one-way
repack of its 4-bit weight into the layout of its fast CPU kernel, done on the first eval-mode
forward without grad; elsewhere it never repacks. finetune.models.load turns the repack off for
training models (under FSDP it broke the next checkpoint; see test_load.py). Here the capability
bitsandbytes consults (`has_avx512bf16`, read when a Linear4bit is built) is forced both ways, and
every NF4 path runs under each: load + validation, checkpoint save and resume, the eval load of
the QLoRA adapter, and the merge into the base, through the CLI.
"""

from __future__ import annotations

import pytest
import torch

from finetune.models import load as fm
from test_bad_input import run_cli
from tiny_peft import lora_cfg as make_cfg

QUIET = ["output.progress=false", "output.plot=false", "data.cache=false"]


@pytest.fixture(params=[True, False], ids=["avx512bf16", "no-avx512bf16"])
def avx512bf16(request, monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.nn.modules as modules

    monkeypatch.setattr(modules, "has_avx512bf16", lambda: request.param)
    assert bnb.nn.Linear4bit(8, 8).support_avx512bf16_for_cpu is request.param  # the flag took
    return request.param


def _packed(model) -> bool:
    return any(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
               for m in model.modules() if hasattr(m, "weight"))


def test_training_model_never_repacks_and_keeps_its_state_dict(tiny_model, avx512bf16):
    cfg = make_cfg()
    cfg.quant.mode = "nf4"
    model = fm.load_model(cfg, "cpu")
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items() if v.dtype == torch.uint8}
    model.eval()
    with torch.no_grad():  # validation: the moment bitsandbytes would repack
        model(input_ids=torch.randint(3, 259, (1, 8)))
    assert not _packed(model)
    after = model.state_dict()
    assert before and all(torch.equal(after[k], v) for k, v in before.items())


def test_nf4_run_validates_saves_resumes_evaluates_and_merges(tmp_path, capsys, avx512bf16):
    from finetune.models.adapters import load_for_inference

    out = tmp_path / "run"
    base = ["recipe=tiny-lora", f"out_dir={out}", "quant.mode=nf4", "train.eval_every=1", "train.save_every=1",
            "train.eval_batches=1", *QUIET]
    rc, _, err = run_cli([*base, "train.max_steps=1", "train.warmup_steps=1"], capsys)
    assert rc == 0, err
    rc, stdout, err = run_cli([*base, "train.max_steps=2", "resume=auto"], capsys)
    assert rc == 0, err
    assert "continuing to train.max_steps=2" in stdout

    model, tok = load_for_inference(out / "final", dtype=torch.float32, device="cpu")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.randint(3, 259, (1, 8))).logits).all()
    del model

    rc, _, err = run_cli(["merge", f"adapter={out / 'final'}", f"out_dir={tmp_path / 'merged'}"], capsys)
    assert rc == 0, err
    assert (tmp_path / "merged" / "config.json").is_file()
