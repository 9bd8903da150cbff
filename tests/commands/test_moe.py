"""`finetune moe`: build from a YAML through the CLI, then the routing report of what it built."""

import json

import pytest
import yaml
from tiny_peft import random_lora_adapter

from finetune.commands.moe import Args, run
from finetune.errors import UsageError


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-adapters")
    return {"a": random_lora_adapter(root / "a", tiny_model, seed=1, scale=0.1),
            "b": random_lora_adapter(root / "b", tiny_model, seed=2, scale=0.1)}


def test_cli_builds_from_yaml_and_reports(tiny_model, adapters, tmp_path):
    import finetune.cli as cli

    cfg = {"base_model": str(tiny_model), "gate_mode": "cheap_embed", "experts_per_token": 1,
           "experts": [{"adapter": str(adapters["a"]), "positive_prompts": ["code: def"]},
                       {"adapter": str(adapters["b"]), "positive_prompts": ["math: 1+1"]}]}
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.run(["moe", f"config={tmp_path / 'moe.yaml'}", f"out_dir={tmp_path / 'moe'}"]) == 0
    assert (tmp_path / "moe" / "mergekit_moe_config.yml").is_file()
    rows = [{"text": "def f(): return 1"}, {"messages": [{"role": "user", "content": "1+1?"},
                                                         {"role": "assistant", "content": "2"}]},
            {"instruction": "add", "input": "2 and 3", "output": "5"}]
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert run(Args(report=str(tmp_path / "moe"), data=str(tmp_path / "eval.jsonl"),
                    out_dir=str(tmp_path / "rep"))) == 0
    stats = json.loads((tmp_path / "rep" / "routing.json").read_text())
    assert stats["layers"] == 2 and stats["experts"] == 2 and stats["top_k"] == 1 and stats["rows"] == 3
    for layer in range(2):
        assert sum(stats["utilisation"][layer]) == pytest.approx(1.0)
        assert sum(stats["top1_share"][layer]) == pytest.approx(1.0)
        assert sum(stats["mean_prob"][layer]) == pytest.approx(1.0, abs=1e-4)
    assert (tmp_path / "rep" / "routing.png").stat().st_size > 1000
    with pytest.raises(UsageError, match="not a MoE"):
        run(Args(report=str(tiny_model), data=str(tmp_path / "eval.jsonl"), out_dir=str(tmp_path / "rep2")))
    with pytest.raises(UsageError, match="exactly one of"):
        run(Args(out_dir=str(tmp_path / "x")))


def test_report_needs_data(tiny_model, tmp_path):
    with pytest.raises(UsageError, match="report= needs data=FILE"):
        run(Args(report=str(tiny_model), out_dir=str(tmp_path / "rep")))
    assert not (tmp_path / "rep").exists()
