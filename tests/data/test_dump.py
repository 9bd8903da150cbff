"""`finetune data recipe=R [overrides] dump=PATH`: what is trained, as JSON lines, through the CLI."""

import json

import pytest
from helpers import TOOLS_TEMPLATE  # tests/data/helpers.py (conftest.py puts it on the path)

from finetune.cli import main as cli_main


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main([str(a) for a in args])
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "400")


def test_dump_writes_each_example_with_its_trained_segments(tmp_path, capsys):
    rows = [{"conversations": [{"from": "human", "value": "w?"},
                               {"from": "function_call", "value": '{"name": "w", "arguments": {"c": 1}}'},
                               {"from": "observation", "value": "OBS"}, {"from": "gpt", "value": "done"}],
             "tools": '[{"name": "w"}]'},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(rows))
    template = tmp_path / "tools.jinja"
    template.write_text(TOOLS_TEMPLATE)
    dump = tmp_path / "seen.jsonl"
    rc, out, err = run_cli(["data", "recipe=tiny-lora", "n=1", f"data.path={data}", "data.format=sharegpt",
                            f"data.chat_template={template}", "data.val_fraction=0", "output.progress=false",
                            f"dump={dump}"], capsys)
    assert rc == 0, err
    assert f"wrote 2 training examples to {dump}" in out
    assert "all in the template's own format" in out
    got = sorted((json.loads(line) for line in dump.read_text().splitlines()), key=lambda r: len(r["text"]))
    assert got[0]["text"] == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
    assert got[0]["trained"] == ["a<|im_end|>"]
    assert len(got[0]["input_ids"]) == len(got[0]["labels"]) and got[0]["labels"][0] == -100
    assert got[1]["trained"] == ['<tool_call>\n{"name": "w", "arguments": {"c": 1}}\n</tool_call><|im_end|>',
                                 "done<|im_end|>"]
    assert "OBS" in got[1]["text"] and not any("OBS" in s for s in got[1]["trained"])


def test_dump_into_a_folder_is_one_line_error(tmp_path, capsys):
    rc, out, err = run_cli(["data", "recipe=tiny-lora", "n=0", "output.progress=false", f"dump={tmp_path}"], capsys)
    assert rc == 2 and err.count("error:") == 1 and "is a folder" in err
