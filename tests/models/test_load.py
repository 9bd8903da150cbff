"""Model loading (finetune.models.load) on the tiny random Llama: names, tokenizer, LoRA, real
NF4/int8 QLoRA on CPU, one-line errors; the train section of a recipe is not read."""

import math

import pytest
import torch

from finetune.config import load_config
from finetune.errors import FinetuneError, UsageError
from finetune.models import load as fm
from tiny_peft import logits
from tiny_peft import lora_cfg as make_cfg


# --------------------------------------------------------------------------- names and hub options


def test_resolve_aliases_and_local_paths(tmp_path, tiny_model, monkeypatch):
    assert fm.resolve_model_path("tiny") == str(tiny_model)
    assert fm.resolve_model_path("TINY") == str(tiny_model)
    assert fm.resolve_model_path(str(tiny_model)) == str(tiny_model)
    monkeypatch.chdir(tiny_model.parent)
    assert fm.resolve_model_path(f"./{tiny_model.name}") == str(tiny_model)
    assert fm.resolve_model_path("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"

    (tmp_path / "file.gguf").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text("{}")
    for bad, words in [("./does-not-exist", "not found"), ("/no/such/model", "not found"),
                       ("~/no-such-model-dir", "not found"), (str(tmp_path / "file.gguf"), "is a file"),
                       (str(tmp_path / "empty"), "no config.json"), (str(tmp_path / "ad"), "adapter"),
                       ("not a valid id!", "valid hub id"), ("", "empty")]:
        with pytest.raises(UsageError, match=words) as e:
            fm.resolve_model_path(bad)
        assert "\n" not in str(e.value)


def test_unknown_hub_id_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FinetuneError) as e:
        fm.load_tokenizer("no-such-org-xyz/no-such-model-xyz")
    assert str(e.value) == "model 'no-such-org-xyz/no-such-model-xyz' not found locally and the hub is unreachable"


def test_fsdp_gives_every_parameter_one_dtype():
    """FSDP flattens each unit into one tensor: LoRA (peft keeps it fp32) and norms (k-bit prep
    upcasts them) take the 4-bit storage dtype, which is the compute dtype."""
    bnb = pytest.importorskip("bitsandbytes")
    cfg = load_config("tiny-qlora", {"strategy": "fsdp", "quant.compute_dtype": "bfloat16"})
    model = fm.load_model(cfg, "cpu")
    packed = [p for p in model.parameters() if isinstance(p, bnb.nn.Params4bit)]
    assert packed and {p.dtype for p in packed} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert any(p.requires_grad for p in model.parameters())


def test_trust_remote_code_only_when_set(caplog):
    assert "trust_remote_code" not in fm.hub_kwargs(None, False)
    with caplog.at_level("WARNING", logger="finetune.models.load"):
        assert fm.hub_kwargs("v1", True) == {"revision": "v1", "trust_remote_code": True}
    assert "trust_remote_code=true" in caplog.text


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_pad_is_not_eos(tiny_model):
    tok = fm.load_tokenizer(make_cfg().model)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"
    assert tok("Hi")["input_ids"] == [3 + ord("H"), 3 + ord("i")]


def test_ensure_pad_prefers_existing_tokens_and_adds_last(tiny_model):
    from finetune.models.tiny import byte_tokenizer

    tok = byte_tokenizer()
    tok.pad_token = tok.eos_token
    assert fm.ensure_pad_token(tok) is None
    assert tok.pad_token == "<|endoftext|>" and len(tok) == 259

    tok = byte_tokenizer()
    tok.eos_token = "<|endoftext|>"  # now the only candidate is eos itself
    tok.pad_token = "<|endoftext|>"
    assert fm.ensure_pad_token(tok) == fm.NEW_PAD
    assert tok.pad_token == fm.NEW_PAD and tok.pad_token_id == 259 != tok.eos_token_id


# --------------------------------------------------------------------------- LoRA / QLoRA


def test_lora_trains_only_lora_params(tiny_model):
    model = fm.load_model(make_cfg(), "cpu")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # 2 layers x 7 linear layers (all-linear skips lm_head) x A,B
    assert model.peft_config["default"].target_modules  # all-linear expanded by peft
    assert model.config.use_cache is False
    assert model.base_model.model.is_gradient_checkpointing
    assert not fm.quantized_modules(model)
    assert next(model.parameters()).dtype == torch.float32


def test_nf4_qlora_is_really_4bit_and_trains(tiny_model):
    import bitsandbytes as bnb

    cfg = make_cfg()
    cfg.quant.mode = "nf4"
    model = fm.load_model(cfg, "cpu")
    quant = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quant) == 14 and len(fm.quantized_modules(model)) == 14
    for m in quant:
        assert isinstance(m.weight, bnb.nn.Params4bit) and m.weight.dtype == torch.uint8
        assert m.weight.quant_state.quant_type == "nf4"
        assert m.weight.quant_state.nested  # double quantization is on by default
        assert m.compute_dtype == torch.float32
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)

    model.train()
    ids = torch.randint(3, 259, (2, 12))
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_validation_in_eval_mode_keeps_the_4bit_layout(tiny_model):
    """On AVX512-BF16 CPUs bitsandbytes repacks a 4-bit weight in place when a Linear4bit runs in
    eval mode without grad; a training model must keep one layout (under FSDP the repack broke the
    next checkpoint), so the layout and the state dict survive an eval-mode forward on any CPU."""
    cfg = make_cfg()
    cfg.quant.mode = "nf4"
    model = fm.load_model(cfg, "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".weight") and v.dtype == torch.uint8}
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.randint(3, 259, (1, 8)))
    assert not any(getattr(m.weight, "quant_state", None) is not None
                   and getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in model.modules() if hasattr(m, "weight"))
    after = model.state_dict()
    assert before and all(torch.equal(after[k], v) for k, v in before.items())


def test_same_seed_same_lora_init_whether_or_not_bitsandbytes_was_probed(tiny_model, monkeypatch):
    # the once-per-process bitsandbytes probe must not draw from the global RNG: a second run in
    # the same process would otherwise start from another LoRA init
    monkeypatch.setattr(fm, "_PROBED", {})
    cfg = make_cfg()
    cfg.quant.mode = "nf4"
    inits = []
    for _ in range(2):  # the first load probes, the second does not
        torch.manual_seed(0)
        model = fm.load_model(cfg, "cpu")
        inits.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n})
    assert inits[0].keys() == inits[1].keys()
    assert all(torch.equal(inits[0][k], inits[1][k]) for k in inits[0])


def test_nf4_options_reach_bitsandbytes(tiny_model):
    import bitsandbytes as bnb

    cfg = make_cfg(target_modules=["q_proj"])
    cfg.quant.mode, cfg.quant.double_quant, cfg.quant.storage_dtype = "nf4", False, "float32"
    model = fm.load_model(cfg, "cpu")
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert not layer.weight.quant_state.nested and layer.weight.dtype == torch.float32


def test_int8_runs_on_cpu(tiny_model):
    import bitsandbytes as bnb

    cfg = make_cfg(target_modules=["q_proj", "v_proj"])
    cfg.quant.mode = "int8"
    model = fm.load_model(cfg, "cpu")
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules()) == 14
    ids = torch.randint(3, 259, (1, 8))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_quantization_that_cannot_run_is_one_line(tiny_model, monkeypatch):
    cfg = make_cfg()
    cfg.quant.mode = "nf4"
    monkeypatch.setattr(fm, "_PROBED", {})

    def missing():
        raise ImportError("No module named 'bitsandbytes'")

    monkeypatch.setattr(fm, "_import_bnb", missing)
    with pytest.raises(FinetuneError, match=r"quant.mode=nf4 needs bitsandbytes, which is not installed"):
        fm.load_model(cfg, "cpu")
    monkeypatch.undo()

    import bitsandbytes as bnb

    monkeypatch.setattr(fm, "_PROBED", {})

    def unsupported(*a, **k):
        raise RuntimeError("no kernel for this device\nlong trace")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", unsupported)
    with pytest.raises(FinetuneError, match=r"quant.mode=nf4 cannot run on cpu .*no kernel for this device; use") as e:
        fm.load_model(cfg, "cpu")
    assert "\n" not in str(e.value)


def test_target_modules_matching_nothing(tiny_model):
    with pytest.raises(UsageError) as e:
        fm.load_model(make_cfg(target_modules=["query_key_value"]), "cpu")
    msg = str(e.value)
    assert msg.startswith("lora.target_modules ['query_key_value'] matched no module of tiny; linear modules are: ")
    assert "q_proj" in msg and "down_proj" in msg and "\n" not in msg
    with pytest.raises(UsageError, match="use it alone"):
        fm.load_model(make_cfg(target_modules=["all-linear", "q_proj"]), "cpu")


def test_named_targets_and_modules_to_save(tiny_model):
    model = fm.load_model(make_cfg(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]), "cpu")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = {n.split(".")[-4] for n in trainable if "lora_" in n}
    assert lora == {"q_proj", "v_proj"}
    assert any("lm_head.modules_to_save" in n for n in trainable)
    with pytest.raises(UsageError, match="modules_to_save: 'lm_haed' matched no module"):
        fm.load_model(make_cfg(modules_to_save=["lm_haed"]), "cpu")


def test_dora_and_rslora_reach_peft(tiny_model):
    model = fm.load_model(make_cfg(use_dora=True, use_rslora=True, r=4, alpha=8,
                                   target_modules=["q_proj"]), "cpu")
    pc = model.peft_config["default"]
    assert pc.use_dora and pc.use_rslora and pc.r == 4 and pc.lora_alpha == 8
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / math.sqrt(4))
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())
    ids = torch.randint(3, 259, (1, 8))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()


class _NoTrainSection:
    def __getattr__(self, name):
        raise AssertionError(f"load_model read cfg.train.{name}")


def test_load_model_reads_no_train_setting(tiny_model):
    cfg = make_cfg()
    cfg.train = _NoTrainSection()
    model = fm.load_model(cfg, "cpu", gradient_checkpointing=False)
    assert not model.base_model.model.is_gradient_checkpointing  # told, not read from cfg.train
    assert not any("forward" in vars(m) for m in model.modules())  # memory features are applied elsewhere


def test_same_seed_same_lora_init(tiny_model):
    def init(seed):
        torch.manual_seed(seed)
        m = fm.load_model(make_cfg(), "cpu")
        return {n: p.detach().clone() for n, p in m.named_parameters() if "lora_A" in n}

    a, b, c = init(3), init(3), init(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_inference_model_plain_and_nf4(tiny_model):
    import bitsandbytes as bnb

    base = fm.load_inference_model(tiny_model, torch.float32, "cpu")
    assert type(base).__name__ == "LlamaForCausalLM" and not base.training
    assert {p.dtype for p in base.parameters()} == {torch.float32} and not fm.quantized_modules(base)
    q = fm.load_inference_model(tiny_model, torch.float32, "cpu", nf4=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in q.modules()) and not q.training
    assert {m.compute_dtype for m in q.modules() if isinstance(m, bnb.nn.Linear4bit)} == {torch.float32}
    assert torch.allclose(logits(base), logits(q), atol=0.5)  # 4-bit is close, not equal


def test_full_precision_refuses_a_quantized_checkpoint(tiny_model, tmp_path):
    import json
    import shutil

    model = fm.load_full_precision(str(tiny_model))
    assert {p.dtype for p in model.parameters()} == {torch.float32} and not fm.quantized_modules(model)
    stored = tmp_path / "q"
    shutil.copytree(tiny_model, stored)
    cfg = json.loads((stored / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (stored / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="stored quantized"):
        fm.load_full_precision(str(stored))


def test_copy_tokenizer_takes_the_first_usable_source(tiny_model, tmp_path):
    (tmp_path / "no-tok").mkdir()
    assert fm.copy_tokenizer(tmp_path / "out", str(tmp_path / "no-tok"), str(tiny_model)) == str(tiny_model)
    assert fm.read_tokenizer(tmp_path / "out")("hi")["input_ids"] == fm.read_tokenizer(tiny_model)("hi")["input_ids"]
    with pytest.raises(FinetuneError, match="no tokenizer found"):
        fm.copy_tokenizer(tmp_path / "out2", str(tmp_path / "no-tok"))


def test_load_gguf_refuses_a_file_transformers_reads_only_in_part(tmp_path, monkeypatch):
    # A Mixtral GGUF: transformers maps no expert tensors and returns freshly initialised MLPs, which
    # a fidelity report would then score as the file (0% agreement for a faithful export).
    import finetune.models.load as load_mod

    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(load_mod.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: (model, {"missing_keys": {"model.layers.0.mlp.gate_proj.weight"}}))
    with pytest.raises(ValueError, match="reads 1 weights of m.gguf as missing"):
        load_mod.load_gguf(tmp_path / "m.gguf", torch.float32, "cpu")
    monkeypatch.setattr(load_mod.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: (model, {"missing_keys": set()}))
    assert load_mod.load_gguf(tmp_path / "m.gguf", torch.float32, "cpu") is model
