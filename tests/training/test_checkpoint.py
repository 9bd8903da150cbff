"""Checkpoints: atomic, verified, resumable; nothing lost on a full disk or a kill."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from finetune.training import checkpoint as ck
from finetune.training.state import capture_rng
from finetune.errors import FinetuneError, UsageError

CONFIG_YAML = "lora:\n  r: 4\n"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base_dir():
    from finetune.models.tiny import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="module")
def tokenizer(base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


def _peft_model(base_dir, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj"]))
    # lora_B starts at zero; make it non-zero so a round-trip compares something real.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def model(base_dir):
    return _peft_model(base_dir)


def _state(step=5):
    return {"step": step, "tokens": 1234, "lr": 1.5e-4, "data": {"epoch": 0, "position": [3, 1, 2]},
            "note": "x", "optimizer": {"m": torch.arange(6.0)}, "rng": capture_rng()}


def _save(out, step, model, tokenizer, state=True):
    return ck.save_checkpoint(ck.step_dir(out, step), model=model, tokenizer=tokenizer,
                              config_yaml=CONFIG_YAML, state=_state(step) if state else None)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- save / verify


def test_save_layout_and_verify(tmp_path, model, tokenizer):
    out = tmp_path / "out"
    p = _save(out, 5, model, tokenizer)
    assert p == out / "step-000005"
    names = {q.name for q in p.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.yaml", "training_state.pt",
            "manifest.json", "COMPLETE", "tokenizer.json"} <= names
    assert (p / "config.yaml").read_text() == CONFIG_YAML
    assert ck.is_complete(p)
    # Nothing but the checkpoint is left in out_dir: the temp dir was renamed, not copied.
    assert [q.name for q in out.iterdir()] == ["step-000005"]
    assert ck.latest_checkpoint(out) == p


def test_state_roundtrip_weights_only(tmp_path, model, tokenizer):
    p = _save(tmp_path, 7, model, tokenizer)
    # The file itself loads with plain torch and weights_only=True.
    raw = torch.load(p / "training_state.pt", weights_only=True)
    st = ck.load_state(p)
    for s in (raw, st):
        assert s["step"] == 7 and s["data"]["position"] == [3, 1, 2] and s["note"] == "x"
        assert torch.equal(s["optimizer"]["m"], torch.arange(6.0))


class Arbitrary:
    """A picklable non-tensor object: torch.save accepts it, weights_only loading must not."""


def test_state_with_pickled_object_is_refused(tmp_path, model, monkeypatch):
    # At save time: refused before anything is written.
    with pytest.raises(FinetuneError, match=r"step-000001: training state is not loadable with weights_only=True \(it holds a pickled .*Arbitrary\)"):
        ck.save_checkpoint(tmp_path / "step-000001", model=model, config_yaml="", state={"obj": Arbitrary()})
    assert list(tmp_path.iterdir()) == []
    # At load time (a checkpoint written by someone else): never unpickled.
    monkeypatch.setattr(ck, "_check_weights_only", lambda buf, path: None)
    p = ck.save_checkpoint(tmp_path / "step-000001", model=model, config_yaml="", state={"obj": Arbitrary()})
    with pytest.raises(FinetuneError, match="cannot load .*training_state.pt with weights_only=True.*Arbitrary"):
        ck.load_state(p)


def test_adapter_dir_loads_with_plain_peft(tmp_path, model, tokenizer, base_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    p = ck.save_checkpoint(tmp_path / "final", model=model, tokenizer=tokenizer, config_yaml=CONFIG_YAML,
                           state=None)
    assert not (p / "training_state.pt").exists() and ck.is_complete(p)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), p)
    ids = torch.tensor([[5, 9, 70, 71, 72]])
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_load_adapter_weights(tmp_path, model, base_dir):
    p = ck.save_checkpoint(tmp_path / "step-000003", model=model, config_yaml="", state=None)
    fresh = _peft_model(base_dir, seed=1)
    ck.load_adapter_weights(fresh, p)
    a = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    b = {k: v for k, v in fresh.state_dict().items() if "lora_" in k}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resave_final_replaces_atomically(tmp_path, model, tokenizer, monkeypatch):
    final = tmp_path / "final"
    ck.save_checkpoint(final, model=model, tokenizer=tokenizer, config_yaml="a: 1\n", state=None)
    # Observe the directory at the moment the new copy is renamed in: the old one must still exist.
    seen = []
    real_rename = os.rename

    def watch(src, dst):
        seen.append((Path(src).name, Path(dst).name, ck.is_complete(final) or any(
            ck.is_complete(q) for q in tmp_path.iterdir() if q.name.startswith(ck.OLD_PREFIX))))
        return real_rename(src, dst)

    monkeypatch.setattr(ck.os, "rename", watch)
    ck.save_checkpoint(final, model=model, tokenizer=tokenizer, config_yaml="a: 2\n", state=None)
    assert all(ok for *_, ok in seen) and len(seen) == 2
    assert (final / "config.yaml").read_text() == "a: 2\n" and ck.is_complete(final)
    assert [q.name for q in tmp_path.iterdir()] == ["final"]


def test_never_replaces_a_foreign_dir(tmp_path, model):
    final = tmp_path / "final"
    final.mkdir()
    (final / "mine.txt").write_text("user data")
    with pytest.raises(FinetuneError, match="not a checkpoint written by finetune"):
        ck.save_checkpoint(final, model=model, config_yaml="", state=None)
    assert _snapshot(tmp_path) == {"final/mine.txt": b"user data"}


# --------------------------------------------------------------------------- partial / corrupt


def test_partial_and_temp_dirs_never_picked(tmp_path, model, tokenizer, capsys):
    good = _save(tmp_path, 2, model, tokenizer)
    # A later save killed before its marker: temp dir, and a step dir without COMPLETE.
    tmp_dir = tmp_path / ".tmp-step-000009.host.1.abc"
    tmp_dir.mkdir()
    (tmp_dir / "adapter_model.safetensors").write_bytes(b"half")
    no_marker = tmp_path / "step-000008"
    no_marker.mkdir()
    (no_marker / "adapter_model.safetensors").write_bytes(b"half")
    (tmp_path / "step-000010.txt").write_text("not a checkpoint")
    assert ck.latest_checkpoint(tmp_path) == good
    assert not ck.is_complete(no_marker) and not ck.is_complete(tmp_dir)
    assert "warning" not in capsys.readouterr().err  # incomplete is normal after a kill, not news


@pytest.mark.parametrize("victim", ["adapter_model.safetensors", "training_state.pt", "config.yaml",
                                    "manifest.json"])
def test_flipped_byte_detected(tmp_path, model, tokenizer, capsys, victim):
    good = _save(tmp_path, 1, model, tokenizer)
    bad = _save(tmp_path, 2, model, tokenizer)
    f = bad / victim
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    assert not ck.is_complete(bad)
    assert ck.latest_checkpoint(tmp_path) == good
    err = capsys.readouterr().err
    assert "warning" in err and "step-000002" in err
    with pytest.raises(FinetuneError, match=victim.replace(".", r"\.")):
        ck.load_state(bad)


def test_truncated_file_detected(tmp_path, model, tokenizer):
    p = _save(tmp_path, 1, model, tokenizer)
    f = p / "training_state.pt"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(FinetuneError, match="training_state.pt.*truncated"):
        ck.load_state(p)


# --------------------------------------------------------------------------- disk full


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_writing_state_keeps_previous(tmp_path, model, tokenizer, monkeypatch):
    prev = _save(tmp_path, 5, model, tokenizer)
    before = _snapshot(tmp_path)
    real = ck._write_bytes

    def half_then_full(path, data):
        if Path(path).name == "training_state.pt":
            Path(path).write_bytes(bytes(data[: len(data) // 2]))  # a partial file, like a real full disk
            _enospc()
        return real(path, data)

    monkeypatch.setattr(ck, "_write_bytes", half_then_full)
    with pytest.raises(FinetuneError) as e:
        _save(tmp_path, 10, model, tokenizer)
    msg = str(e.value)
    assert "step-000010" in msg and "disk full" in msg and f"previous checkpoint {prev} is intact" in msg
    assert "\n" not in msg
    assert _snapshot(tmp_path) == before  # no temp dir, no partial step-000010, prev byte-identical
    assert ck.latest_checkpoint(tmp_path) == prev and ck.load_state(prev)["step"] == 5


def test_disk_full_in_safetensors_when_replacing_final(tmp_path, model, tokenizer, monkeypatch):
    import peft.peft_model

    final = ck.save_checkpoint(tmp_path / "final", model=model, tokenizer=tokenizer, config_yaml="old\n",
                               state=None)
    before = _snapshot(tmp_path)

    def full(*a, **k):  # what safetensors' Rust writer raises on ENOSPC
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full)
    with pytest.raises(FinetuneError, match=r"disk full.*previous checkpoint .*final is intact"):
        ck.save_checkpoint(final, model=model, tokenizer=tokenizer, config_yaml="new\n", state=None)
    assert _snapshot(tmp_path) == before and ck.is_complete(final)


def test_disk_full_with_no_previous_checkpoint(tmp_path, model, monkeypatch):
    monkeypatch.setattr(ck, "_write_bytes", _enospc)
    with pytest.raises(FinetuneError, match="disk full.*no earlier checkpoint was touched"):
        ck.save_checkpoint(tmp_path / "step-000001", model=model, config_yaml="", state=None)
    assert list(tmp_path.iterdir()) == []


def test_interrupt_during_save_cleans_up(tmp_path, model, monkeypatch):
    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "_build_manifest", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path / "step-000001", model=model, config_yaml="", state=None)
    assert list(tmp_path.iterdir()) == []


def test_recover_after_kill_between_renames(tmp_path, model):
    final = ck.save_checkpoint(tmp_path / "final", model=model, config_yaml="old\n", state=None)
    # A writer (dead pid) moved final aside and died before renaming its new copy in.
    dead = _dead_pid()
    aside = tmp_path / f".old-final.{ck._host()}.{dead}.deadbeef"
    os.rename(final, aside)
    stale_tmp = tmp_path / f".tmp-final.{ck._host()}.{dead}.cafe0000"
    stale_tmp.mkdir()
    ck.recover(tmp_path)
    assert ck.is_complete(final) and (final / "config.yaml").read_text() == "old\n"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["final"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- prune


def test_prune_keeps_newest_complete(tmp_path, model):
    for s in (1, 2, 3, 4, 5):
        ck.save_checkpoint(ck.step_dir(tmp_path, s), model=model, config_yaml="", state=None)
    ck.save_checkpoint(tmp_path / "final", model=model, config_yaml="", state=None)
    (tmp_path / "step-000006").mkdir()  # incomplete: not counted, not removed
    (tmp_path / "metrics.csv").write_text("loss\n")
    removed = ck.prune(tmp_path, 2)
    assert [p.name for p in removed] == ["step-000001", "step-000002", "step-000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "final", "metrics.csv", "step-000004", "step-000005", "step-000006"]
    assert ck.prune(tmp_path, None) == []
    with pytest.raises(UsageError):
        ck.prune(tmp_path, 0)


def test_prune_never_trades_the_last_good_checkpoint_for_a_corrupt_one(tmp_path, model):
    for s in (1, 2, 3):
        ck.save_checkpoint(ck.step_dir(tmp_path, s), model=model, config_yaml="", state=None)
    (tmp_path / "step-000003" / "config.yaml").write_text("flipped")
    assert [p.name for p in ck.prune(tmp_path, 1)] == ["step-000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000003"]


# --------------------------------------------------------------------------- bitsandbytes optimizers


def _opt_roundtrip(make_opt, base_dir, tmp_path):
    """Train 2 steps, checkpoint, 2 more; vs. reload from the checkpoint into fresh objects + 2 steps."""
    torch.manual_seed(0)
    model = _peft_model(base_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_opt(params)
    ids = torch.randint(3, 200, (1, 16))

    def step():
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    for _ in range(2):
        step()
    p = ck.save_checkpoint(tmp_path / "step-000002", model=model, config_yaml="",
                           state={"step": 2, "optimizer": opt.state_dict()})
    for _ in range(2):
        step()
    want = {n: t.detach().clone() for n, t in model.named_parameters() if t.requires_grad}

    model = _peft_model(base_dir, seed=7)
    ck.load_adapter_weights(model, p)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = make_opt(params)
    state = ck.load_state(p)
    opt.load_state_dict(state["optimizer"])
    for _ in range(2):
        step()
    got = {n: t.detach() for n, t in model.named_parameters() if t.requires_grad}
    assert want.keys() == got.keys()
    for n in want:
        assert torch.equal(want[n], got[n]), n
    return state


@pytest.mark.parametrize("name", ["AdamW8bit", "PagedAdamW8bit"])
def test_bnb_optimizer_state_resumes_bit_exact(name, base_dir, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    import warnings

    cls = getattr(bnb.optim, name)
    # min_8bit_size=1 so the tiny LoRA matrices really use 8-bit blockwise state (default skips < 4096).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "paged optimizers are not supported on CPU"
        state = _opt_roundtrip(lambda ps: cls(ps, lr=1e-2, min_8bit_size=1), base_dir, tmp_path)
    quant = [s for s in state["optimizer"]["state"].values() if "__bnb_optimizer_quant_state__" in s
             or any(isinstance(v, torch.Tensor) and v.dtype == torch.uint8 for v in s.values())]
    assert quant, "expected 8-bit optimizer state"


def test_torch_adamw_state_resumes_bit_exact(base_dir, tmp_path):
    _opt_roundtrip(lambda ps: torch.optim.AdamW(ps, lr=1e-2), base_dir, tmp_path)


# --------------------------------------------------------------------------- kill -9 mid-save

KILL_SCRIPT = textwrap.dedent("""
    import sys, os
    from pathlib import Path
    import torch
    from finetune.training import checkpoint as ck

    class Fake:  # duck-typed PeftModel: keeps torch/peft model building out of the timing
        def save_pretrained(self, d, **kw):
            Path(d, "adapter_model.safetensors").write_bytes(os.urandom(1 << 20))
            Path(d, "adapter_config.json").write_text("{}")

    out = Path(sys.argv[1])
    print("ready", flush=True)
    for step in range(1, 10_000):
        st = {"step": step, "w": torch.randn(256, 256)}
        ck.save_checkpoint(ck.step_dir(out, step), model=Fake(), config_yaml="", state=st)
        ck.save_checkpoint(out / "final", model=Fake(), config_yaml="", state=None)
        ck.prune(out, 2)
""")


@pytest.mark.slow
def test_kill_9_during_saves_never_exposes_a_partial_checkpoint(tmp_path):
    import signal
    import time

    repo = Path(__file__).resolve().parents[2]
    rng = random.Random(0)
    for trial in range(5):
        out = tmp_path / f"run{trial}"
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out)], cwd=repo,
                                stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(repo)})
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.3, 2.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        steps = [p for p in out.iterdir() if ck.STEP_RE.match(p.name)] if out.exists() else []
        # Every visible step dir is complete: the only partial work is hidden temp/old dirs.
        assert all(ck.is_complete(p) for p in steps), [p.name for p in steps if not ck.is_complete(p)]
        ck.recover(out)
        names = sorted(p.name for p in out.iterdir()) if out.exists() else []
        assert not [n for n in names if n.startswith(".")], names
        if steps:
            latest = ck.latest_checkpoint(out)
            assert latest is not None and ck.load_state(latest)["step"] == int(latest.name[5:])
        if (out / "final").exists():
            assert ck.is_complete(out / "final")
