"""Many processes on CPU (gloo): data sharding, validation batches, one writer, same adapter.

The cheap tests check the pieces (BatchStream shards, validation batches, pre-launch usage
checks). The CLI tests launch real processes through Fabric's subprocess launcher; the one that
compares 2 processes with 1 and checks what rank 0 alone writes is in the default run, the
resume-across-device-counts ones are marked slow.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune.config import gradient_accumulation, load_config
from finetune.data.pack import PackedUnits
from finetune.data.stream import BatchStream
from finetune.errors import UsageError

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-4


# --------------------------------------------------------------------------- sharding


def fake_units(n: int, seed: int = 0) -> list[dict]:
    lengths = np.random.default_rng(seed).integers(3, 40, size=n)
    return [{"input_ids": [i + 3] * int(k), "labels": [i + 3] * int(k), "position_ids": list(range(int(k)))}
            for i, k in enumerate(lengths)]


def consumed(units, steps: int, world: int, G: int = 8, micro: int = 2, group_by_length=False) -> list[list[int]]:
    """Per step, the unit indices all ranks consume (rank by rank, micro-batch by micro-batch)."""
    streams = [BatchStream(units, G, micro, world_size=world, rank=r, seed=3, group_by_length=group_by_length)
               for r in range(world)]
    return [[j for s in streams for chunk in s.rank_indices(step) for j in chunk] for step in range(steps)]


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("n", [16, 20, 37])
@pytest.mark.parametrize("group_by_length", [False, True])
def test_each_unit_once_per_epoch_across_ranks(world, n, group_by_length):
    G, epochs = 8, 3
    steps = -(-epochs * n // G)
    per_step = consumed(fake_units(n), steps, world, G, group_by_length=group_by_length)
    single = consumed(fake_units(n), steps, 1, G, group_by_length=group_by_length)
    for mine, ref in zip(per_step, single):
        assert len(mine) == G and Counter(mine) == Counter(ref)  # same units per step on any device count
    # Stream positions [e*n, (e+1)*n) are epoch e: read in stream order, each unit exactly once.
    streams = BatchStream(fake_units(n), G, 2, seed=3)
    flat = [j for step in range(steps) for j in streams.global_indices(step)] if not group_by_length else None
    if flat is not None:
        for e in range(epochs):
            assert sorted(flat[e * n:(e + 1) * n]) == list(range(n))
    # Whatever the in-step order, every unit is consumed `epochs` times over whole epochs' worth of steps.
    if (epochs * n) % G == 0:
        assert Counter(j for step in per_step for j in step) == Counter({j: epochs for j in range(n)})


def test_ranks_take_disjoint_slices():
    units = fake_units(24)
    a, b = (BatchStream(units, 8, 2, world_size=2, rank=r, seed=1) for r in (0, 1))
    for step in range(6):
        ra = [j for c in a.rank_indices(step) for j in c]
        rb = [j for c in b.rank_indices(step) for j in c]
        assert len(ra) == len(rb) == 4 and not set(ra) & set(rb)
        assert sorted(ra + rb) == sorted(a.global_indices(step))


def test_packed_examples_seen_once_per_epoch_across_ranks():
    """Ranks consume packs; every example inside them is trained exactly once per epoch."""
    rng = np.random.default_rng(0)
    n_examples, seq_len = 90, 64
    lens = rng.integers(4, 40, size=n_examples)
    # token id = example id + 3 identifies the example a packed token came from
    ids = np.concatenate([np.full(k, i + 3) for i, k in enumerate(lens)])
    units = PackedUnits.build(ids, ids.copy(), lens, seq_len=seq_len, packing=True)
    assert len(units) < n_examples  # packing did combine examples
    G, world = 4, 2
    n = len(units)
    steps = n // G  # whole steps inside epoch 0
    streams = [BatchStream(units, G, 1, world_size=world, rank=r, seed=7) for r in range(world)]
    seen = Counter()
    for step in range(steps):
        for s in streams:
            for batch in s.step_batches(step):
                for row, pos in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist()):
                    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
                    for a, b in zip(starts, starts[1:]):
                        seg = set(row[a:b])
                        if seg != {0}:  # padding tail
                            assert len(seg) == 1
                            seen[seg.pop() - 3] += 1
    covered = {j for step in range(steps) for j in streams[0].global_indices(step)}
    expected = {int(e) for u in covered for e in set(units[u]["input_ids"])}
    assert set(seen) == {e - 3 for e in expected} and set(seen.values()) == {1}
    if steps * G == n:
        assert len(seen) == n_examples


def test_global_batch_must_divide_over_devices():
    cfg = load_config("tiny-lora", {})  # global 4, micro 2
    assert gradient_accumulation(cfg, 1, 2) == 2
    assert gradient_accumulation(cfg, 2, 2) == 1
    with pytest.raises(UsageError, match="not divisible"):
        gradient_accumulation(cfg, 4, 2)


# --------------------------------------------------------------------------- validation batches


def sft():
    from finetune.training.objectives import objective_for

    return objective_for(load_config("tiny-lora", {}))


@pytest.mark.parametrize("n_val", [1, 3, 5, 6])
def test_validation_batches_equal_count_and_independent_of_world(n_val):
    from finetune.training.loop import _val_batches

    units = fake_units(n_val)
    trained = {}
    for world in (1, 2, 3):
        batches = [_val_batches(sft(), units, 2, SimpleNamespace(global_rank=r, world_size=world), 0, 20)
                   for r in range(world)]
        assert len({len(b) for b in batches}) == 1  # every rank runs equally many forwards
        trained[world] = sorted(int(t) for b in batches for x in b for t in x["labels"][x["labels"] != -100])
    assert trained[1] == trained[2] == trained[3]  # the same tokens scored whatever the device count
    assert _val_batches(sft(), [], 2, SimpleNamespace(global_rank=0, world_size=2), 0, 20) is None


def test_validation_respects_eval_batches_globally():
    from finetune.training.loop import _val_batches

    units = fake_units(40)
    one = _val_batches(sft(), units, 2, SimpleNamespace(global_rank=0, world_size=1), 0, 3)
    two = [_val_batches(sft(), units, 2, SimpleNamespace(global_rank=r, world_size=2), 0, 3) for r in (0, 1)]
    tokens = lambda bs: sorted(int(t) for b in bs for t in b["labels"][b["labels"] != -100])
    assert len(one) == 3 and tokens(one) == tokens(two[0] + two[1])


# --------------------------------------------------------------------------- usage errors before launch


@pytest.mark.parametrize("overrides, message", [
    ({"devices": "1"}, "needs devices x num_nodes >= 2"),
    ({"train.optimizer": "paged_adamw_8bit"}, "needs train.optimizer=adamw"),
    ({"quant.mode": "int8"}, "cannot shard int8"),
    ({"quant.mode": "nf4", "quant.storage_dtype": "uint8"}, "storage_dtype=auto or a float dtype"),
    ({"precision": "64-true"}, r"strategy=fsdp supports precision 32-true, .* \(got 64-true\)"),  # bad-input 30f
])
def test_fsdp_settings_it_cannot_run_are_usage_errors_before_launch(overrides, message):
    from finetune.training.loop import make_fabric

    cfg = load_config("tiny-lora", {"strategy": "fsdp", "accelerator": "cpu", "devices": "2", **overrides})
    with pytest.raises(UsageError, match=message):
        make_fabric(cfg)


def test_optimizer_state_converts_between_position_and_name_keys():
    """A checkpoint's optimizer state is keyed by position (single process, DDP) or by parameter
    name (FSDP); either loads under the other, matched by name, whatever the parameter order."""
    from finetune.training.distributed import CheckpointState
    from finetune.models.load import load_model
    from finetune.training.objectives.sft import CausalLMLoss

    cfg = load_config("tiny-lora", {"accelerator": "cpu"})
    model = load_model(cfg, "cpu")
    lossmod = CausalLMLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    cs = CheckpointState(lossmod, model, opt)
    by_name = cs._by_name(opt.state_dict())
    assert all(isinstance(k, str) and k.startswith("model.base_model.") for k in by_name["state"])
    # a name-keyed state in another order (as FSDP may list it) comes back to this optimizer's positions
    shuffled = {"state": dict(reversed(list(by_name["state"].items()))),
                "param_groups": [{**g, "params": list(reversed(g["params"]))} for g in by_name["param_groups"]]}
    back = cs._by_position(shuffled)
    fresh = torch.optim.AdamW(params, lr=1e-2)
    fresh.load_state_dict(back)
    for p in params:
        assert torch.equal(fresh.state[p]["exp_avg"], opt.state[p]["exp_avg"])
    shuffled["state"].pop(next(iter(shuffled["state"])))
    shuffled["param_groups"][0]["params"].pop(0)
    with pytest.raises(UsageError, match="does not fit this model"):
        cs._by_position(shuffled)


def test_preflight_catches_rank0_only_mistakes_before_launch(tmp_path):
    from finetune.training.loop import _preflight

    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(UsageError, match="holds files finetune did not write: keep.txt"):
        _preflight(load_config("tiny-lora", {"out_dir": str(tmp_path), "devices": "2"}))
    with pytest.raises(UsageError, match="not divisible"):
        _preflight(load_config("tiny-lora", {"out_dir": str(tmp_path / "new"), "devices": "4"}))
    with pytest.raises(UsageError, match="not a complete checkpoint"):
        _preflight(load_config("tiny-lora", {"out_dir": str(tmp_path / "new"), "resume": str(tmp_path)}))


# --------------------------------------------------------------------------- real processes


def cli(out_dir, devices: int, *extra: str, timeout: int = 300, recipe: str = "tiny-lora",
        strategy: str = "ddp") -> subprocess.CompletedProcess:
    given = {e.split("=", 1)[0] for e in extra}  # extra replaces a default (a key given twice is refused)
    defaults = [f"recipe={recipe}", "train.max_steps=6", "train.seed=5", "accelerator=cpu", f"devices={devices}",
                f"out_dir={out_dir}", "output.progress=false"]
    cmd = [sys.executable, "-m", "finetune.cli", *[d for d in defaults if d.split("=", 1)[0] not in given], *extra]
    if devices > 1:
        cmd.append(f"strategy={strategy}")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def in_process(out_dir, recipe: str = "tiny-lora", **overrides):
    from finetune.training.loop import main, make_fabric

    cfg = load_config(recipe, {"out_dir": str(out_dir), "output.progress": "false", "train.max_steps": "6",
                                    "train.seed": "5", "accelerator": "cpu",
                                    **{k: str(v) for k, v in overrides.items()}})
    return main(make_fabric(cfg), cfg)


def run_dir_holding(step_dir: Path, out: Path) -> Path:
    """A fresh out_dir whose only content is a copy of `step_dir`, to resume from."""
    out.mkdir()
    shutil.copytree(step_dir, out / step_dir.name)
    return out


def max_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The 1-process reference run, with step checkpoints to resume from on 2 processes."""
    out = tmp_path_factory.mktemp("d1") / "run"
    return in_process(out, **{"train.save_every": 3})


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("d2") / "run"
    proc = cli(out, 2, "train.save_every=3")
    return out, proc


def test_two_processes_equal_one_and_rank0_writes_once(one_process, two_processes):
    out, proc = two_processes
    diff = max_diff(one_process.final_dir, out / "final")
    assert diff < TOL, diff
    # rank 0 alone writes: one final/, one step dir, no temp or side dirs left, one log file
    assert sorted(p.name for p in out.iterdir()) == ["final", "logs", "step-000003"]
    assert [p.name for p in (out / "logs").iterdir()] == ["metrics.csv"]
    assert proc.stdout.count("saved adapter") == 1
    assert proc.stdout.count("training 16,384 parameters") == 1
    assert "[rank: 1]" not in proc.stdout + proc.stderr
    # both runs log the same losses (all-reduced over ranks)
    import csv

    rows = [r for r in csv.DictReader(open(out / "logs" / "metrics.csv")) if r["train_loss"]]
    losses = [float(r["train_loss"]) for r in rows]
    assert np.allclose(losses, [l for _, l in one_process.state.losses], atol=1e-5)


@pytest.mark.slow
def test_resume_on_one_process_from_two(one_process, two_processes, tmp_path):
    out, _ = two_processes
    part = run_dir_holding(out / "step-000003", tmp_path / "part")
    resumed = in_process(part, resume="auto", **{"train.save_every": 3})
    assert resumed.state.step == 6
    assert max_diff(one_process.final_dir, resumed.final_dir) < TOL


@pytest.mark.slow
def test_resume_on_two_processes_from_one(one_process, tmp_path):
    part = run_dir_holding(one_process.final_dir.parent / "step-000003", tmp_path / "part")
    proc = cli(part, 2, "resume=auto", "train.save_every=3")
    assert "resumed from" in proc.stdout and proc.stdout.count("saved adapter") == 1
    assert max_diff(one_process.final_dir, part / "final") < TOL


@pytest.mark.slow
def test_two_process_usage_error_is_one_line(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    cmd = [sys.executable, "-m", "finetune.cli", "recipe=tiny-lora", "accelerator=cpu", "devices=2",
           "strategy=ddp", f"out_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "did not write: keep.txt" in proc.stderr


# --------------------------------------------------------------------------- FSDP (torch's FSDP on CPU, gloo)

FSDP_QLORA = ("train.optimizer=adamw", "train.save_every=3")


@pytest.fixture(scope="module")
def qlora_one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("q1") / "run"
    return in_process(out, recipe="tiny-qlora", **{"train.optimizer": "adamw", "train.save_every": 3})


@pytest.fixture(scope="module")
def qlora_fsdp(tmp_path_factory):
    out = tmp_path_factory.mktemp("q2") / "run"
    return out, cli(out, 2, *FSDP_QLORA, recipe="tiny-qlora", strategy="fsdp")


def test_fsdp_qlora_two_processes_equal_one(qlora_one_process, qlora_fsdp):
    """QLoRA under FSDP: the NF4 weights are sharded with everything else (rank 0 holds half the
    parameter bytes), the adapter is gathered to rank 0 and equals the 1-process run's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, proc = qlora_fsdp
    line = next(l for l in proc.stdout.splitlines() if l.startswith("FSDP: rank 0 holds"))
    held, whole = (float(x) for x in re.findall(r"([0-9.]+) MiB", line))
    assert held < 0.6 * whole, line
    assert max_diff(qlora_one_process.final_dir, out / "final") < TOL
    assert max_diff(qlora_one_process.final_dir.parent / "step-000003", out / "step-000003") < TOL
    assert sorted(p.name for p in out.iterdir()) == ["final", "logs", "step-000003"]
    assert proc.stdout.count("saved adapter") == 1
    # the gathered adapter is a plain PEFT adapter dir
    base_name = json.loads((out / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_name)
    PeftModel.from_pretrained(base, str(out / "final"))
    state = torch.load(out / "final" / "training_state.pt", weights_only=True)
    assert all(isinstance(k, str) for k in state["optimizer"]["state"])  # FSDP saves it by name


def test_fsdp_with_mlp_tiles_equals_one_process(tmp_path):
    """MLP tiles (checkpoints inside FSDP's layer units, inside HF's layer checkpoint) train the
    same adapter on 2 FSDP processes as on one."""
    tiles = ("train.optimizer=adamw", "train.mlp_tile_size=24")
    one = in_process(tmp_path / "one", recipe="tiny-qlora", **dict(t.split("=") for t in tiles))
    proc = cli(tmp_path / "two", 2, *tiles, recipe="tiny-qlora", strategy="fsdp")
    assert "2 MLPs run 24 tokens at a time" in proc.stdout
    assert max_diff(one.final_dir, tmp_path / "two" / "final") < TOL


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_without_fsdp_and_back(qlora_one_process, qlora_fsdp, tmp_path):
    out, _ = qlora_fsdp
    on_one = run_dir_holding(out / "step-000003", tmp_path / "one")
    resumed = in_process(on_one, recipe="tiny-qlora", resume="auto", **{"train.optimizer": "adamw",
                                                                        "train.save_every": 3})
    assert resumed.state.step == 6 and max_diff(qlora_one_process.final_dir, resumed.final_dir) < TOL
    on_two = run_dir_holding(qlora_one_process.final_dir.parent / "step-000003", tmp_path / "two")
    proc = cli(on_two, 2, *FSDP_QLORA, "resume=auto", recipe="tiny-qlora", strategy="fsdp")
    assert "resumed from" in proc.stdout
    assert max_diff(qlora_one_process.final_dir, on_two / "final") < TOL


@pytest.mark.slow
def test_fsdp_bf16_mixed_gives_one_dtype_per_unit(tmp_path):
    """The GPU setting (bf16-mixed, 4-bit storage in bf16) on CPU: without one dtype per FSDP unit,
    torch refuses to flatten ("Must flatten tensors with uniform dtype")."""
    proc = cli(tmp_path / "run", 2, "train.optimizer=adamw", "train.max_steps=2", "precision=bf16-mixed",
               "quant.compute_dtype=bfloat16", recipe="tiny-qlora", strategy="fsdp")
    assert "saved adapter" in proc.stdout


@pytest.mark.slow
def test_dpo_on_two_processes_equals_one(tmp_path):
    # pairs as the normaliser across ranks, the reference pass inside DDP's forward, blank
    # validation pairs on the short rank: the same adapter and the same logged rewards
    one = in_process(tmp_path / "one", recipe="tiny-dpo", **{"train.max_steps": 3})
    two = tmp_path / "two"
    cli(two, 2, "train.max_steps=3", recipe="tiny-dpo")
    assert max_diff(one.final_dir, two / "final") < TOL
    import csv

    a = [r for r in csv.DictReader(open(tmp_path / "one" / "logs" / "metrics.csv")) if r["train_loss"]]
    b = [r for r in csv.DictReader(open(two / "logs" / "metrics.csv")) if r["train_loss"]]
    for key in ("train_loss", "rewards_chosen", "reward_accuracy", "logps_rejected"):
        assert np.allclose([float(r[key]) for r in a], [float(r[key]) for r in b], atol=1e-4), key
