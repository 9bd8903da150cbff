"""`finetune moe` against mergekit-moe, built from the same YAML (slow).

mergekit pins its own torch/transformers, so it lives in a separate environment: the test runs it
as a subprocess with the Python named by MERGEKIT_PYTHON, else the Python beside a `mergekit-moe`
on PATH, else the current one if it imports mergekit; it skips where none has it. Set up
(bench/README.md, "mergekit"): python -m venv /work/mk-venv && /work/mk-venv/bin/pip install
torch==2.13.0 mergekit==0.1.5, then MERGEKIT_PYTHON=/work/mk-venv/bin/python.

Expected (issue 26): random (mergekit seeded 0), uniform_random and cheap_embed bit for bit;
hidden within bf16 rounding (mergekit runs the prompts through a bf16 copy of the base). The
experts' weights are copied, so they are compared exactly in every mode.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

# Seeds the global generator (mergekit's random gates draw from it), then runs mergekit-moe's CLI.
RUN_MERGEKIT = ("import sys, torch; torch.manual_seed(int(sys.argv[1])); "
                "from mergekit.scripts.moe import main; main(sys.argv[2:], standalone_mode=True)")


def mergekit_python() -> str:
    """A Python that imports mergekit, or skip."""
    candidates = [os.environ.get("MERGEKIT_PYTHON")]
    cli = shutil.which("mergekit-moe")
    if cli:
        candidates.append(str(Path(cli).parent / "python"))
    candidates.append(sys.executable)
    for py in filter(None, candidates):
        if Path(py).exists() and subprocess.run([py, "-c", "import mergekit"], capture_output=True).returncode == 0:
            return py
    pytest.skip("mergekit is not installed (set MERGEKIT_PYTHON to a Python that has it: bench/README.md)")


def _experts(tiny_model, root):
    from tiny_peft import random_lora_adapter

    from finetune.merge import merge_adapter

    out = []
    for seed in (1, 2):
        a = random_lora_adapter(root / f"a{seed}", tiny_model, seed=seed, scale=0.1)
        out.append(str(merge_adapter(str(a), str(root / f"e{seed}"))))
    return out


def _tensors(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _per_expert(tensors: dict) -> dict:
    """mergekit 0.1.5 under transformers 5 writes the fused expert layout (mlp.experts.gate_up_proj
    [E, 2I, H] with gate then up, mlp.experts.down_proj [E, H, I], mlp.gate); `finetune moe` writes
    Mixtral's per-expert names (block_sparse_moe.experts.N.w1/w2/w3), which transformers 4 and
    llama.cpp's converter read too. Both load as the same model; compare in the per-expert names."""
    out = {}
    for k, t in tensors.items():
        pre, sep, leaf = k.partition(".mlp.")
        if not sep:
            out[k] = t
        elif leaf == "gate.weight":
            out[f"{pre}.block_sparse_moe.gate.weight"] = t
        elif leaf == "experts.gate_up_proj":
            for e, w in enumerate(t):
                gate, up = w.chunk(2, dim=0)
                out[f"{pre}.block_sparse_moe.experts.{e}.w1.weight"] = gate.contiguous()
                out[f"{pre}.block_sparse_moe.experts.{e}.w3.weight"] = up.contiguous()
        elif leaf == "experts.down_proj":
            for e, w in enumerate(t):
                out[f"{pre}.block_sparse_moe.experts.{e}.w2.weight"] = w.contiguous()
        else:
            out[k] = t
    return out


def _mergekit(py, cfg_path, out, mode, seed=0):
    args = [str(cfg_path), str(out), "--device", "cpu"]
    if mode in ("random", "uniform_random"):
        args.append("--i-understand-this-is-not-useful-without-training")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)  # mergekit's own environment, not this checkout's
    r = subprocess.run([py, "-c", RUN_MERGEKIT, str(seed), *args], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]


@pytest.fixture(scope="module")
def mk_python():
    return mergekit_python()


@pytest.mark.parametrize("mode,atol", [("random", 0), ("uniform_random", 0), ("cheap_embed", 0),
                                       ("hidden", 2e-2), ("hidden_avg", 2e-2), ("hidden_last", 2e-2)])
def test_same_yaml_same_moe(mk_python, tiny_model, tmp_path, mode, atol):
    import yaml

    from finetune.moe.build import build_moe
    from finetune.moe.spec import load_moe_config

    e1, e2 = _experts(tiny_model, tmp_path)
    prompts = [["write code", "def f():"], ["a poem", "roses are red"]]
    if mode == "hidden_avg":
        # mergekit batches an expert's prompts with padding and averages over the padded length,
        # pad positions included; we average over each prompt's own tokens. Equal lengths agree.
        prompts = [["write code", "def f(): 1"], ["a poem ode", "roses red!"]]
    cfg = {"base_model": str(tiny_model), "gate_mode": mode, "dtype": "float32", "experts_per_token": 2,
           "experts": [{"source_model": e1, "positive_prompts": prompts[0]},
                       {"source_model": e2, "positive_prompts": prompts[1]}]}
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    build_moe(load_moe_config(str(path)), str(ours))
    _mergekit(mk_python, path, theirs, mode)
    a, b = _per_expert(_tensors(ours)), _per_expert(_tensors(theirs))
    assert sorted(a) == sorted(b)
    for k in a:
        if ".gate." in k:
            assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())
        else:
            assert torch.equal(a[k], b[k]), k
