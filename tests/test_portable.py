"""Outputs that load elsewhere: 4.x-readable configs and tokenizers, hub ids instead of this
machine's paths, files readable per the umask. (The real transformers 4.57 round trip is
bench/transformers4_check.py, slow-marked in tests/test_transformers4.py.)"""

import json
import os
import stat

import pytest
import torch
from tiny_peft import make_model, random_lora_adapter

from finetune.merge import merge_adapter
from finetune.portable import hub_id, legacy_rope, portable_tokenizer, record_hub_base
from finetune.training.checkpoint import save_checkpoint

IDS = torch.tensor([[1, 75, 108, 3 + ord("h"), 3 + ord("i"), 2, 40, 50]])


def test_legacy_rope_default_and_scaled():
    cfg = legacy_rope({"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}})
    assert cfg["rope_theta"] == 100000.0 and cfg["rope_scaling"] is None
    llama31 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = legacy_rope({"rope_parameters": llama31})
    assert cfg["rope_theta"] == 500000.0
    assert cfg["rope_scaling"] == {**{k: v for k, v in llama31.items() if k != "rope_theta"}, "type": "llama3"}
    assert cfg["rope_parameters"] == llama31
    assert legacy_rope({"rope_theta": 7.0}) == {"rope_theta": 7.0}  # a 4.x config stays as it is


def test_portable_tokenizer_names_a_4x_class(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "TokenizersBackend", "is_local": True, "extra_special_tokens": ["<a>"]}))
    portable_tokenizer(tmp_path)
    data = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert data == {"tokenizer_class": "PreTrainedTokenizerFast", "additional_special_tokens": ["<a>"]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    portable_tokenizer(tmp_path)  # a class both versions know is left alone
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == {"tokenizer_class": "LlamaTokenizer"}


def test_hub_id_of_local_copies(tmp_path):
    embedded = tmp_path / "smollm2"
    embedded.mkdir()
    (embedded / "finetune-embedded.json").write_text(json.dumps({"hub_id": "Org/Model-1B"}))
    assert hub_id(str(embedded)) == "Org/Model-1B"
    snap = tmp_path / "hub" / "models--Org--Model-1B" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    assert hub_id(str(snap)) == "Org/Model-1B"
    assert hub_id(str(tmp_path)) == str(tmp_path)  # any other directory: as given
    assert hub_id("Org/Other") == "Org/Other"


def test_training_checkpoint_records_the_hub_id(tmp_path, tiny_model):
    model = make_model()
    # What peft records when the base was loaded from the embedded model's local copy.
    local = tmp_path / "local-copy"
    local.mkdir()
    (local / "finetune-embedded.json").write_text(json.dumps({"hub_id": "Org/Tiny"}))
    model.peft_config["default"].base_model_name_or_path = str(local)
    model.get_base_model().config._name_or_path = str(local)  # what the README's base_model comes from
    out = save_checkpoint(tmp_path / "final", model=model, config_yaml="a: 1\n")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "Org/Tiny"
    readme = (out / "README.md").read_text()
    assert str(local) not in readme and "base_model: Org/Tiny" in readme


def test_record_hub_base_override(tmp_path, tiny_model):
    a = random_lora_adapter(tmp_path / "a", tiny_model, seed=1)
    assert record_hub_base(a, "Org/Tiny") == "Org/Tiny"
    assert json.loads((a / "adapter_config.json").read_text())["base_model_name_or_path"] == "Org/Tiny"
    assert str(tiny_model) not in (a / "README.md").read_text()


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_merged_model_portable_and_readable(tmp_path, tiny_model, umask_022):
    a = random_lora_adapter(tmp_path / "a", tiny_model, seed=1)
    out = merge_adapter(str(a), str(tmp_path / "merged"))
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes.values()) == {0o644}, modes
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] and cfg["rope_scaling"] is None
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "is_local" not in tok_cfg

    # transformers 5 reads the legacy keys' config exactly as before, and the tokenizer too.
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(out).rope_parameters == cfg["rope_parameters"]
    ids = AutoTokenizer.from_pretrained(out)("hi")["input_ids"]
    assert ids == AutoTokenizer.from_pretrained(tiny_model)("hi")["input_ids"]


def test_merge_base_override(tmp_path, tiny_model):
    a = random_lora_adapter(tmp_path / "a", tiny_model, seed=1)
    record_hub_base(a, "Org/NotHere")  # e.g. an adapter from another machine
    out = merge_adapter(str(a), str(tmp_path / "merged"), base=str(tiny_model))
    assert (out / "model.safetensors").is_file()


def test_eval_base_override(tmp_path, tiny_model):
    from finetune.eval.checkpoints import resolve_checkpoints

    a = random_lora_adapter(tmp_path / "a", tiny_model, seed=1)
    record_hub_base(a, "Org/NotHere")
    ckpts = resolve_checkpoints(["base", str(a)], base="tiny")
    assert [c.path for c in ckpts if c.kind == "base"] == [str(tiny_model.resolve())]
    assert [c.base for c in ckpts if c.kind == "adapter"] == [str(tiny_model.resolve())]
