"""What `finetune data` shows: an example with its trained tokens set apart, decoded whole."""

from rich.console import Console

from finetune.data.show import show_example
from finetune.data.tokenize import IGNORE
from finetune.models.tiny import byte_tokenizer


def test_trained_runs_are_bold_green_and_multibyte_characters_stay_whole():
    tok = byte_tokenizer()
    prompt, answer = tok.encode("Q: é?", add_special_tokens=False), tok.encode("ü!", add_special_tokens=False)
    assert len(answer) == 3  # ü is two bytes: decoded one token at a time it would break
    console = Console(record=True, width=80, color_system="truecolor")
    show_example(console, tok, prompt + answer, [IGNORE] * len(prompt) + answer, "example 1")
    text = console.export_text(clear=False)
    assert "Q: é?ü!" in text and "example 1" in text and "trained" in text
    ansi = console.export_text(styles=True)
    assert "\x1b[1;32mü!\x1b[0m" in ansi and "\x1b[2mQ: é?\x1b[0m" in ansi  # trained bold green, context dim
