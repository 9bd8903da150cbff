"""`finetune merge`: the command's arguments, and what it refuses before any weight loads."""

import pytest
from tiny_peft import random_lora_adapter

from finetune.commands.merge import Args, run
from finetune.typed import build
from finetune.errors import UsageError


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"a": random_lora_adapter(root / "a", tiny_model, seed=1, r=4),
            "b": random_lora_adapter(root / "b", tiny_model, seed=2, r=4)}


def test_merge_cli_refuses_non_empty_out_dir(adapters, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    with pytest.raises(UsageError, match="not empty"):
        run(Args(adapter=str(adapters["a"]), out_dir=str(out)))
    # overwrite=true replaces out_dir whole, so a file no finetune command wrote is refused
    with pytest.raises(UsageError, match="holds files finetune did not write: keep.txt"):
        run(Args(adapter=str(adapters["a"]), out_dir=str(out), overwrite=True))
    assert (out / "keep.txt").read_text() == "user file"  # never deleted


def test_merge_overwrite_replaces_an_earlier_merge_whole(adapters, tmp_path):
    """An old model.safetensors beside new shards would load first: the folder must be replaced whole."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "m"
    run(Args(adapter=str(adapters["a"]), out_dir=str(out)))
    assert (out / "model.safetensors").is_file()
    run(Args(adapter=str(adapters["b"]), out_dir=str(out), overwrite=True, max_shard_size="20000"))
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    AutoModelForCausalLM.from_pretrained(out)  # the new shards load


def test_merge_usage_errors(adapters, tmp_path):
    with pytest.raises(UsageError, match="exactly one"):
        run(Args(out_dir=str(tmp_path / "x")))
    with pytest.raises(UsageError, match="not found"):
        run(Args(adapter=str(tmp_path / "missing"), out_dir=str(tmp_path / "x")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="adapter_config.json"):
        run(Args(adapter=str(tmp_path / "empty"), out_dir=str(tmp_path / "x")))
    with pytest.raises(UsageError, match="dtype"):
        run(Args(adapter=str(adapters["a"]), out_dir=str(tmp_path / "x"), dtype="fp8"))


def test_combine_arguments_refused_as_typed(adapters, tmp_path):
    with pytest.raises(UsageError, match="method must be one of linear, cat, svd, ties, .*got 'tie'"):
        build(Args, {"adapters": f"[{adapters['a']},{adapters['b']}]", "method": "tie"})
    with pytest.raises(UsageError, match=r"density must be in \(0, 1\], got 2.0"):
        build(Args, {"method": "ties", "density": "2"})
    both = [str(adapters["a"]), str(adapters["b"])]
    with pytest.raises(UsageError, match="base= applies to adapter= merges"):
        run(Args(adapters=both, base=str(adapters["a"]), out_dir=str(tmp_path / "x")))
    with pytest.raises(UsageError, match="dtype= applies to adapter= merges"):
        run(Args(adapters=both, dtype="bf16", out_dir=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()
