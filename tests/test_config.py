import pytest
import yaml

from finetune.config import Config, field_paths, load_config, to_yaml
from finetune.resources import find_resource, list_resources
from finetune.errors import UsageError


def test_every_recipe_loads_and_roundtrips():
    names = list_resources("recipes")
    for required in ["qlora-7b-alpaca", "qlora-7b-sharegpt", "qlora-8b-sharegpt", "lora-3b-alpaca",
                     "qlora-3b-sharegpt", "demo", "tiny-lora", "tiny-qlora"]:
        assert required in names
    for name in names:
        cfg = load_config(name, {})
        assert cfg.description, f"recipe {name} has no description"
        # A recipe is just a serialized Config: dumping and reloading changes nothing.
        again = load_config(None, {k: yaml.safe_dump(v, default_flow_style=True).strip()
                                   for k, v in _flat(yaml.safe_load(to_yaml(cfg))).items()})
        assert again == cfg


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("columns", "roles"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_overrides_types_and_lists():
    cfg = load_config("tiny-lora", {"train.max_steps": "3", "lora.target_modules": "[q_proj,v_proj]",
                                    "train.lr": "1e-3", "data.packing": "false", "train.micro_batch_size": "auto"})
    assert cfg.train.max_steps == 3 and cfg.train.lr == 1e-3 and cfg.data.packing is False
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.micro_batch_size == "auto"


@pytest.mark.parametrize("key,value,expect", [
    ("trian.max_steps", "3", "did you mean train.max_steps"),
    ("train.max_step", "3", "did you mean train.max_steps"),
    ("train.max_steps", "three", "train.max_steps (expected int)"),
    ("quant.mode", "nf3", "quant.mode"),
    ("train", "3", "is a section"),
])
def test_override_errors_name_the_key(key, value, expect):
    with pytest.raises(UsageError) as e:
        load_config("tiny-lora", {key: value})
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_unknown_recipe_lists_close_matches():
    with pytest.raises(UsageError, match="did you mean qlora-7b-alpaca"):
        load_config("qlora-7b-alpacca", {})


def test_recipe_lookup_path_then_cwd_then_packaged(tmp_path, monkeypatch):
    own = tmp_path / "mine.yaml"
    own.write_text("description: mine\ntrain:\n  max_steps: 7\n")
    assert load_config(str(own), {}).train.max_steps == 7
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "tiny-lora.yaml").write_text("description: local copy\ntrain:\n  max_steps: 9\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("tiny-lora", {}).train.max_steps == 9  # ./recipes wins over the packaged one
    assert find_resource("recipes", "demo").name == "demo.yaml"


@pytest.mark.parametrize("text,expect", [
    ("- a\n- b\n", "must be a YAML mapping"),
    ("train: {max_steps: [\n", "is not valid YAML"),
    ("trian:\n  max_steps: 3\n", "did you mean train.max_steps"),
])
def test_bad_recipe_files(tmp_path, text, expect):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(UsageError, match=expect):
        load_config(str(p), {})


def test_field_docstrings_exist_for_help():
    from finetune.cli import help_for

    text = help_for(Config, "keys")
    assert "train.max_steps=MAX_STEPS" in text and "Optimizer steps to run." in text
    assert len(field_paths(Config)) > 50
