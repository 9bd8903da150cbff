"""data.chat_template is what training renders with and what the adapter's tokenizer carries."""

import pytest

from finetune.config import load_config
from finetune.training.loop import main, make_fabric

BRACKETS = ("{% for m in messages %}{{ '[' + m['role'] + ']' + m['content'] + '<|im_end|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '[assistant]' }}{% endif %}")


@pytest.mark.slow  # a (two-step) training run
def test_custom_chat_template_is_saved_with_the_adapter(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    template = tmp_path / "brackets.jinja"
    template.write_text(BRACKETS)
    cfg = load_config("tiny-lora", {"out_dir": str(tmp_path / "run"), "output.progress": "false",
                                    "train.max_steps": "2", "data.chat_template": str(template)})
    main(make_fabric(cfg), cfg)
    final = tmp_path / "run" / "final"
    assert AutoTokenizer.from_pretrained(final).chat_template == BRACKETS
