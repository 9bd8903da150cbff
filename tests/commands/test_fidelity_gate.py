"""`finetune merge` / `finetune export` with the fidelity report: QLoRA-aware merging measured by
it, the gate (exit 1, output kept as OUT.fidelity-failed), and the refusals before any merge."""

import json
import pytest
from tiny_peft import random_lora_adapter

from finetune.cli import main
from finetune.config import Config, DataSource, to_yaml


@pytest.fixture(scope="module")
def qlora(tiny_model, tmp_path_factory):
    """A LoRA adapter on the tiny model recorded as trained on its NF4 base (config.yaml as a run writes it)."""
    pytest.importorskip("bitsandbytes")
    d = random_lora_adapter(tmp_path_factory.mktemp("fid") / "qlora", tiny_model, seed=7, scale=0.2)
    cfg = Config()
    cfg.model.name = "tiny"
    cfg.quant.mode = "nf4"
    cfg.data.card, cfg.data.val_fraction, cfg.data.seq_len = "sample-alpaca", 0.1, 128
    (d / "config.yaml").write_text(to_yaml(cfg))
    return d


def _main(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    # transformers' load/save bars share stderr; the refusal is the one `error:` line after them
    errors = [line for line in out.err.splitlines() if line.startswith("error:")]
    assert len(errors) <= 1 and "Traceback" not in out.err, out.err
    return e.value.code, out.out, (errors[0] + "\n" if errors else "")


def _ok(argv, capsys) -> str:
    code, out, err = _main(argv, capsys)
    assert code == 0, err
    return out


def _report(path):
    return json.loads((path / "fidelity.json").read_text())


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])
def test_dequantized_merge_is_closer_to_the_adapter_as_trained(qlora, tmp_path, capsys, monkeypatch, precision):
    monkeypatch.setenv("FINETUNE_CPU_PRECISION", precision)
    reports = {}
    for weights in ("dequantized", "original"):
        out = tmp_path / weights
        line = _ok(["merge", f"adapter={qlora}", f"out_dir={out}", f"base_weights={weights}", "fidelity.n=2",
                    "fidelity.max_new_tokens=3"], capsys)
        assert "fidelity (merged vs adapter as trained, 2 held-out rows" in line and "top-1 agreement" in line
        reports[weights] = _report(out)
        assert reports[weights]["base_weights"] == weights and reports[weights]["passed"] is None
        assert len(reports[weights]["continuations"]) == 2
    deq, orig = reports["dequantized"], reports["original"]
    assert deq["mean_kl"] < 1e-4 and deq["top1_agreement"] == 1.0  # the same weights up to fp32 rounding
    assert orig["mean_kl"] > 10 * deq["mean_kl"]  # the NF4 error the adapter never saw
    from finetune.merge import merge_base_weights

    assert merge_base_weights(str(qlora)) == "dequantized"  # auto picks the closer one  # auto picks the closer one


def test_gate_keeps_the_output_named_as_failed(qlora, tmp_path, capsys):
    out = tmp_path / "m"
    code, _, err = _main(["merge", f"adapter={qlora}", f"out_dir={out}", "base_weights=original",
                          "fidelity.n=2", "fidelity.min_agreement=1.0", "fidelity.max_new_tokens=2"], capsys)
    failed = tmp_path / "m.fidelity-failed"
    assert code == 1 and err.startswith("error: fidelity gate:") and err.count("\n") == 1 and str(failed) in err
    assert not out.exists() and (failed / "config.json").is_file()
    assert _report(failed)["passed"] is False
    # A second gated run refuses before merging while the failed output is in the way.
    code, _, err = _main(["merge", f"adapter={qlora}", f"out_dir={out}", "fidelity.min_agreement=0.5"], capsys)
    assert code == 2 and "fidelity-failed exists" in err and not out.exists()


def test_fidelity_data_file(qlora, tmp_path, capsys):
    rows = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("red", "green")]
    f = tmp_path / "rows.json"
    f.write_text(json.dumps(rows))
    _ok(["merge", f"adapter={qlora}", f"out_dir={tmp_path / 'm'}", f"fidelity.data={f}", "fidelity.format=alpaca",
         "fidelity.max_new_tokens=2"], capsys)
    rep = _report(tmp_path / "m")
    assert rep["rows"] == 2 and rep["data"] == str(f)


def test_export_reports_on_the_gguf_it_wrote(qlora, tmp_path, capsys, monkeypatch):
    # No converter here: the "GGUF" is the merged model's directory, read back by a stand-in for
    # transformers' gguf_file= loader; what is checked is that the GGUF is the report's candidate.
    import finetune.eval.fidelity as fid
    import finetune.export as ex
    from finetune.models.adapters import load_for_inference

    seen = []
    monkeypatch.setattr(ex, "converter_dir", lambda: tmp_path)
    monkeypatch.setattr(ex, "convert", lambda src, outfile, quant: (seen.append(src), outfile.write_bytes(b"GGUF")))
    monkeypatch.setattr(fid, "load_gguf", lambda path, dtype, device: load_for_inference(str(seen[0]), dtype, device)[0])
    out = _ok(["export", f"adapter={qlora}", f"out_dir={tmp_path / 'g'}", "fidelity.n=2", "quant=q8_0",
               "fidelity.max_new_tokens=2"], capsys)
    assert "fidelity (gguf vs adapter as trained, 2 held-out rows" in out
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == [".finetune-output", "Modelfile", "fidelity.json", "g-q8_0.gguf"]
    rep = _report(tmp_path / "g")
    assert rep["candidate"] == "g-q8_0.gguf (dequantized by transformers)" and rep["base_weights"] == "dequantized"
    assert rep["top1_agreement"] == 1.0 and "gguf" in rep["perplexity"]


def test_export_falls_back_to_the_merged_model_it_converts(qlora, tmp_path, capsys, monkeypatch):
    import finetune.export as ex

    monkeypatch.setattr(ex, "converter_dir", lambda: tmp_path)
    monkeypatch.setattr(ex, "convert", lambda src, outfile, quant: outfile.write_bytes(b"GGUF"))
    out = _ok(["export", f"adapter={qlora}", f"out_dir={tmp_path / 'g'}", "fidelity.n=2",
               "fidelity.max_new_tokens=2"], capsys)
    assert "fidelity (merged vs adapter as trained, 2 held-out rows" in out  # b"GGUF" is no GGUF transformers reads
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == [".finetune-output", "Modelfile", "fidelity.json", "g-f16.gguf"]
    rep = _report(tmp_path / "g")
    assert rep["candidate"] == "merged model converted to f16 GGUF" and rep["base_weights"] == "dequantized"
    assert rep["gguf_unreadable"]


@pytest.mark.parametrize("extra,says", [
    (["fidelity.min_agreement=0.9"], "fidelity.min_agreement needs held-out rows: "),
    (["fidelity.n=0", "fidelity.min_agreement=0.9"], "fidelity.min_agreement needs a report, but fidelity.n=0"),
    (["base_weights=dequantized"], "base_weights=dequantized applies to adapters trained on an NF4 base"),
    (["fidelity.min_agreement=2"], "fidelity.min_agreement must be in [0, 1], got 2"),
    (["fidelity.data=rows.json"], "fidelity.format is needed for fidelity.data=rows.json"),
])
def test_refusals_before_any_merge(tiny_model, tmp_path, capsys, extra, says):
    plain = random_lora_adapter(tmp_path / "plain", tiny_model, seed=1)  # no config.yaml: no run recorded
    code, _, err = _main(["merge", f"adapter={plain}", f"out_dir={tmp_path / 'm'}", *extra], capsys)
    assert code == 2 and err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "m").exists()


def test_base_weights_only_for_adapter_merges(tmp_path, capsys):
    code, _, err = _main(["merge", "adapters=[a,b]", "base_weights=original", f"out_dir={tmp_path / 'm'}"], capsys)
    assert code == 2 and "base_weights= applies to adapter= merges" in err
    code, _, err = _main(["export", "model=tiny", "base_weights=original", f"out_dir={tmp_path / 'g'}"], capsys)
    assert code == 2 and "base_weights= applies to adapter=" in err


def test_fidelity_on_an_eval_suites_rows(qlora, tmp_path, capsys):
    f = tmp_path / "heldout.jsonl"
    f.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": q}], "answer": a})
                           for q, a in (("Capital?", "Quessmarin"), ("Currency?", "the tidemark"), ("x", "y"))))
    out = _ok(["merge", f"adapter={qlora}", f"out_dir={tmp_path / 'm'}", f"fidelity.data={f}", "fidelity.format=eval",
               "fidelity.n=2", "fidelity.max_new_tokens=2"], capsys)
    assert "2 held-out rows" in out
    rep = _report(tmp_path / "m")
    assert rep["rows"] == 2 and rep["greedy_total"] == 2 and "Capital?" in rep["continuations"][0]["prompt"] + \
        rep["continuations"][1]["prompt"]


def test_adapter_trained_on_several_sources(tiny_model, tmp_path, capsys):
    d = random_lora_adapter(tmp_path / "multi", tiny_model, seed=8, scale=0.2)
    cfg = Config()
    cfg.model.name = "tiny"
    cfg.data.val_fraction, cfg.data.seq_len = 0.1, 128
    cfg.data.sources = [DataSource(card="sample-alpaca"), DataSource(card="sample-sharegpt")]
    (d / "config.yaml").write_text(to_yaml(cfg))
    out = _ok(["merge", f"adapter={d}", f"out_dir={tmp_path / 'm'}", "fidelity.n=2", "fidelity.max_new_tokens=2"],
              capsys)
    assert "2 held-out rows" in out and "2 data.sources" in _report(tmp_path / "m")["data"]
