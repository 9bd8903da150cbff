"""`finetune eval` end to end on the tiny model, and every bad input as one line."""

import json
import subprocess
import sys

import pytest

from finetune import cli
from finetune.errors import UsageError


def test_acceptance_base_vs_adapter(tiny_adapter, tmp_path):
    out = tmp_path / "ev"
    assert cli.run(["eval", "suite=tiny", f"models=[base,{tiny_adapter}]", f"out_dir={out}", "device=cpu",
                    "progress=false"]) == 0
    card = json.loads((out / "scores.json").read_text())
    names = [m["name"] for m in card["models"]]
    assert names == ["base", "run0/final"] or (names[0] == "base" and names[1].endswith("/final"))
    assert [m["kind"] for m in card["models"]] == ["base", "adapter"]
    for name in names:
        s = card["scores"][name]
        assert set(s) == {"qa/loss", "qa/perplexity", "qa/exact_match", "qa/contains", "qa/rouge_l", "qa/chrf",
                          "mc/acc", "mc/acc_norm", "mc-plain/acc", "mc-plain/acc_norm", "text/word_perplexity",
                          "text/byte_perplexity", "text/bits_per_byte"}
        assert s["qa/perplexity"] == pytest.approx(__import__("math").exp(s["qa/loss"]))
    # the perturbed adapter really is a different model
    assert card["scores"][names[0]]["qa/loss"] != card["scores"][names[1]]["qa/loss"]
    md = (out / "scores.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| task"))
    assert f"| base | {names[1]} |" in header
    assert "(+" in md or "(-" in md  # deltas vs base
    assert (out / "scores.png").stat().st_size > 1000
    for name in names:
        rows = [json.loads(x) for x in (out / "generations" / f"{name.replace('/', '_')}.jsonl").read_text().splitlines()]
        assert len(rows) == 6 + 4 + 4 + 3 and "output" in rows[0] and "choice_pred" in rows[-4]
        assert "loglikelihood" in rows[-1]
    # every task and every score names its convention
    conv = card["tasks"]["mc-plain"]["convention"]
    assert conv == {"prompt": "plain", "system_prompt": None, "target_delimiter": " ", "num_fewshot": 0,
                    "harness": "finetune"}
    assert card["tasks"]["mc"]["convention"]["prompt"] == "chat"
    by_key = {r["key"]: r for r in card["rows"]}
    assert by_key["mc/acc"]["convention"].startswith("chat template")
    assert by_key["mc-plain/acc_norm"]["convention"].startswith("plain text")
    assert "per character" in by_key["mc-plain/acc_norm"]["unit"]
    assert "rolling" in by_key["text/bits_per_byte"]["unit"] and by_key["text/bits_per_byte"]["lower_is_better"]
    assert "| mc-plain | plain text, no system prompt" in md and "| text/word_perplexity |" in md
    # an existing scorecard is never overwritten silently
    with pytest.raises(UsageError, match="already holds a scorecard"):
        cli.run(["eval", "suite=tiny", f"models=[base,{tiny_adapter}]", f"out_dir={out}", "device=cpu"])


def test_merged_model_column_and_n(tiny_model, tmp_path):
    card_dir = tmp_path / "ev"
    from finetune.eval import evaluate

    card = evaluate("tiny", [str(tiny_model)], card_dir, n=2, device="cpu", show=False)
    assert [m["kind"] for m in card["models"]] == ["model"]
    assert card["tasks"]["qa"]["n"] == 2 and card["tasks"]["mc"]["n"] == 2


def test_unknown_suite_lists_close_matches(tmp_path):
    with pytest.raises(UsageError, match="unknown eval suite 'tinyy'.*did you mean tiny"):
        cli.run(["eval", "suite=tinyy", "models=[tiny]", f"out_dir={tmp_path}"])


def test_unknown_metric_in_suite_file(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"messages": [{"role": "user", "content": "q"}], "answer": "a"}\n')
    (tmp_path / "s.yaml").write_text("tasks:\n  - {name: t, data: d.jsonl, metrics: [loss, rouge]}\n")
    with pytest.raises(UsageError, match="unknown metric 'rouge'.*did you mean rouge_l"):
        cli.run(["eval", f"suite={tmp_path / 's.yaml'}", "models=[tiny]", f"out_dir={tmp_path / 'o'}"])


def test_missing_checkpoint_path(tmp_path):
    with pytest.raises(UsageError, match="checkpoint not found: .*nope"):
        cli.run(["eval", "suite=tiny", f"models=[base,{tmp_path / 'nope'}]", f"out_dir={tmp_path / 'o'}"])


def test_base_without_adapter(tmp_path):
    with pytest.raises(UsageError, match="'base' means the base model of the adapters"):
        cli.run(["eval", "suite=tiny", "models=[base]", f"out_dir={tmp_path / 'o'}"])


def test_base_is_the_recipes_model(tiny_model, tmp_path):
    out = tmp_path / "o"
    assert cli.run(["eval", "suite=tiny", "models=[base]", "recipe=tiny-lora", "n=1", f"out_dir={out}", "device=cpu",
                    "progress=false"]) == 0
    card = json.loads((out / "scores.json").read_text())
    assert card["models"][0]["name"] == "base" and card["models"][0]["path"] == str(tiny_model)


def test_adapters_on_different_bases(tiny_adapter, adapter_factory, tmp_path):
    from finetune.models.tiny import make_tiny_model

    other = make_tiny_model(tmp_path / "other-base", seed=3)
    a2 = adapter_factory(other, tmp_path / "b" / "final")
    with pytest.raises(UsageError, match="different base models"):
        cli.run(["eval", "suite=tiny", f"models=[base,{tiny_adapter},{a2}]", f"out_dir={tmp_path / 'o'}"])


def test_adapter_for_a_different_base_is_one_line(adapter_factory, tmp_path):
    """An adapter whose config names the tiny model but whose tensors were made for a wider one."""
    from finetune.models.tiny import make_tiny_model, tiny_model_dir

    wide = make_tiny_model(tmp_path / "wide", seed=0, hidden_size=96, intermediate_size=160)
    bad = adapter_factory(wide, tmp_path / "bad" / "final")
    cfg_path = bad / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(tiny_model_dir())
    cfg_path.write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "-m", "finetune.cli", "eval", "suite=tiny", f"models=[base,{bad}]",
                        f"out_dir={tmp_path / 'o'}", "device=cpu", "progress=false"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "does not fit base" in errors[0] and "size" in errors[0]
    assert not (tmp_path / "o" / "scores.json").exists()


def test_data_override_must_exist(tmp_path):
    with pytest.raises(UsageError, match="data=.*no such file"):
        cli.run(["eval", "suite=tiny", "models=[tiny]", "data=/nonexistent/x.jsonl", f"out_dir={tmp_path}"])


def test_bad_row_names_file_and_row(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    (tmp_path / "s.yaml").write_text("tasks:\n  - {name: t, data: d.jsonl, metrics: [exact_match]}\n")
    with pytest.raises(UsageError, match=r"d.jsonl row 1: missing 'answer'"):
        cli.run(["eval", f"suite={tmp_path / 's.yaml'}", "models=[tiny]", f"out_dir={tmp_path / 'o'}"])


@pytest.mark.shared
def test_alpaca_heldout_on_local_copy(shared_data, tmp_path):
    from finetune.eval import evaluate

    card = evaluate("alpaca-heldout", ["tiny"], tmp_path / "ev", data=str(shared_data / "alpaca" / "alpaca_cleaned_1000.json"),
                    n=3, max_new_tokens=4, device="cpu", show=False)
    assert card["tasks"]["alpaca"]["n"] == 3
    assert set(card["scores"]["tiny"]) == {"alpaca/loss", "alpaca/perplexity", "alpaca/rouge_l", "alpaca/chrf"}


def test_run_suite_after_training_writes_beside_adapter(tiny_adapter, tmp_path):
    from finetune.config import load_config
    from finetune.eval import run_suite_after_training

    cfg = load_config("tiny-lora", {"eval.max_new_tokens": "2"})
    card = run_suite_after_training("tiny", tiny_adapter, tmp_path / "eval", cfg)
    assert [m["kind"] for m in card["models"]] == ["base", "adapter"]
    assert (tmp_path / "eval" / "scores.md").is_file()
    # training again into the same out_dir (overwrite=true, resume) scores the new adapter
    again = run_suite_after_training("tiny", tiny_adapter, tmp_path / "eval", cfg)
    assert again["scores"] == card["scores"]
