"""What `finetune data` shows and dumps of preference data: the prompt as context, each answer as what counts."""

import json

from helpers import IM_END, B
from rich.console import Console

from finetune.data.dump import dump_examples, is_preference, pref_record
from finetune.data.pipeline import DataBundle, DataStats
from finetune.data.show import show_data, show_pair


def test_pair_record_and_dump(tok, tmp_path):
    unit = {"prompt_ids": B("Q?"), "chosen_ids": B("yes") + [IM_END], "rejected_ids": B("no") + [IM_END]}
    assert is_preference([unit])
    assert pref_record(tok, unit) == {"prompt": "Q?", "chosen": "yes<|im_end|>", "rejected": "no<|im_end|>",
                                      "prompt_ids": B("Q?"), "chosen_ids": B("yes") + [IM_END],
                                      "rejected_ids": B("no") + [IM_END]}
    out = tmp_path / "d.jsonl"
    assert dump_examples([unit, unit], tok, out) == 2
    assert json.loads(out.read_text().splitlines()[1])["rejected"] == "no<|im_end|>"


def test_unpaired_record_has_completion_and_label(tok):
    rec = pref_record(tok, {"prompt_ids": B("Q"), "completion_ids": B("a"), "label": False})
    assert rec["completion"] == "a" and rec["label"] is False and "chosen" not in rec


def test_pair_panel_styles_prompt_dim_chosen_green_rejected_red(tok):
    console = Console(record=True, width=80, color_system="truecolor")
    show_pair(console, tok, {"prompt_ids": B("Q?"), "chosen_ids": B("yes"), "rejected_ids": B("no")}, "pair 1")
    ansi = console.export_text(styles=True, clear=False)
    assert "\x1b[2mQ?" in ansi and "\x1b[1;32myes" in ansi and "\x1b[1;31mno" in ansi
    assert "chosen: 3 tokens count" in console.export_text()


def test_show_data_with_pairs_then_statistics(tok):
    console = Console(record=True, width=100)
    units = [{"prompt_ids": B("Q"), "chosen_ids": B("a"), "rejected_ids": B("b")}] * 3
    show_data(console, tok, DataBundle(units, [], DataStats(kind="pairs", examples=3)), 2)
    text = console.export_text()
    assert "pair 2" in text and "pair 3" not in text and "train pairs" in text
