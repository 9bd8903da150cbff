import pytest
import yaml

from finetune.config import load_config, to_dict, to_yaml
from finetune.resources import find_resource, list_resources
from finetune.errors import UsageError
from finetune.typed import build


def test_every_recipe_loads_and_roundtrips(tmp_path):
    names = list_resources("recipes")
    for required in ["qlora-7b-alpaca", "qlora-7b-sharegpt", "qlora-8b-sharegpt", "lora-3b-alpaca",
                     "qlora-3b-sharegpt", "demo", "tiny-lora", "tiny-qlora"]:
        assert required in names
    for name in names:
        cfg = load_config(name, {})
        assert cfg.description, f"recipe {name} has no description"
        # A recipe is just a serialized Config: dumping and reloading changes nothing.
        (tmp_path / "again.yaml").write_text(to_yaml(cfg))
        assert load_config(str(tmp_path / "again.yaml"), {}) == cfg
        # ... and so is the command line: every value as a key=value pair (strings as typed).
        typed = {k: v if isinstance(v, str) else yaml.safe_dump(v, default_flow_style=True).strip()
                 for k, v in _flat(to_dict(cfg)).items()}
        assert load_config(None, typed) == cfg
        assert load_config(None, _flat(to_dict(cfg))) == cfg  # the Python API also takes plain values


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
    ("trian.max_steps", "3", "command line: unknown key 'trian.max_steps' (did you mean train.max_steps"),
    ("train.max_step", "3", "did you mean train.max_steps"),
    ("train.max_steps", "three", "command line: train.max_steps: expected an integer, got 'three'"),
    ("quant.mode", "nf3", "command line: quant.mode must be one of none, nf4, int8, got 'nf3'"),
    ("model.attn_implementation", "flash", "must be one of auto, sdpa, eager, flash_attention_2, flex_attention, got 'flash'"),
    ("accelerator", "tpu", "accelerator must be one of auto, cpu, cuda, gpu, mps, got 'tpu'"),
    ("precision", "bf16", "precision must be one of auto, 32-true, bf16-mixed,"),
    ("output.loggers", "[csv,neptune]", "output.loggers must be one of csv, tensorboard, wandb, mlflow, got 'neptune'"),
    ("model", "{attn_implementation: flash}", "model.attn_implementation must be one of"),
    ("train", "3", "train: expected a mapping like {key: value} or a YAML file, got '3'"),
])
def test_override_errors_name_the_key(key, value, expect):
    with pytest.raises(UsageError) as e:
        load_config("tiny-lora", {key: value})
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_sections_and_appends():
    cfg = load_config("tiny-lora", {"model": "{name: smollm2-135m}", "lora.target_modules+": "o_proj",
                                    "precision": "null", "data.system_prompt": "You are: terse"})
    assert cfg.model.name == "smollm2-135m" and cfg.model.attn_implementation == "auto"
    assert cfg.lora.target_modules == load_config("tiny-lora", {}).lora.target_modules + ["o_proj"]
    assert cfg.precision is None and cfg.data.system_prompt == "You are: terse"


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
    ("trian:\n  max_steps: 3\n", r"recipe .*bad.yaml: unknown key 'trian.max_steps' \(did you mean train.max_steps"),
    ("quant:\n  mode: nf3\n", r"recipe .*bad.yaml: quant.mode must be one of none, nf4, int8, got 'nf3'"),
    ("train:\n  lr: fast\n", r"recipe .*bad.yaml: train.lr: expected a finite number, got 'fast'"),
])
def test_bad_recipe_files(tmp_path, text, expect):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(UsageError, match=expect):
        load_config(str(p), {})


def test_command_args_are_parsed_like_the_config():
    from finetune.commands.merge import Args

    args = build(Args, {"adapters": "[a,b]", "weights": "[0.5,0.5]", "method": "ties", "density": "0.5"})
    assert args == Args(adapters=["a", "b"], weights=[0.5, 0.5], method="ties", density=0.5)
    with pytest.raises(UsageError, match="majority_sign_method must be one of total, frequency, got 'most'"):
        build(Args, {"majority_sign_method": "most"})
    with pytest.raises(UsageError, match=r"unknown key 'adaptor' \(did you mean adapter"):
        build(Args, {"adaptor": "x"})
