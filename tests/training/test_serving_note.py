"""Adapters vLLM cannot serve as a LoRA (DoRA, modules_to_save) say so: one line at the end of
training and a Serving section in the adapter's README; a plain LoRA adapter says nothing."""

import json

from tiny_peft import random_lora_adapter

from finetune.config import load_config
from finetune.models.adapters import add_serving_note, serving_note
from finetune.training.checkpoint import is_complete
from finetune.training.loop import main, make_fabric


def test_dora_and_modules_to_save_get_a_note_at_the_end_and_in_the_readme(tmp_path, capsys):
    cfg = load_config("tiny-lora", {"out_dir": str(tmp_path / "run"), "output.progress": "false", "output.plot": "false",
                                    "output.loggers": "[]", "train.max_steps": "1", "lora.use_dora": "true",
                                    "lora.modules_to_save": "[lm_head]"})
    main(make_fabric(cfg), cfg)
    final = tmp_path / "run" / "final"
    out = capsys.readouterr().out.splitlines()
    note = out[-1]
    assert note.startswith("note: vLLM cannot serve this adapter as a LoRA (DoRA, modules_to_save [lm_head])")
    assert "finetune merge adapter=" in note
    readme = (final / "README.md").read_text()
    assert readme.startswith("---\n")  # peft's model card, kept
    assert readme.rstrip().endswith("## Serving\n\nvLLM cannot serve" + note[len("note: vLLM cannot serve"):])
    assert is_complete(final)  # written before the manifest: its checksum covers the note


def test_plain_lora_has_no_note(tiny_model, tmp_path):
    plain = random_lora_adapter(tmp_path / "plain", tiny_model, target_modules=["q_proj"])
    readme = (plain / "README.md").read_text()
    assert serving_note(plain) is None and add_serving_note(plain) is None
    assert (plain / "README.md").read_text() == readme


def test_classification_heads_are_servable_and_bias_is_not(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"modules_to_save": ["score"], "bias": "none"}))
    assert serving_note(tmp_path) is None
    (tmp_path / "adapter_config.json").write_text(json.dumps({"bias": "lora_only"}))
    assert "(a trained bias)" in add_serving_note(tmp_path)
    assert (tmp_path / "README.md").read_text().startswith("## Serving\n\nvLLM cannot serve")
