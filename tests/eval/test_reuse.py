"""Eval loads each base once (adapters are swapped onto it) with the scores and generations of
separate loads, and shows progress in a log: plain lines per task off a terminal."""


import pytest
from tiny_peft import random_lora_adapter

import finetune.models.adapters as adapters
from finetune.eval import evaluate
from finetune.eval.checkpoints import Checkpoint, Loader, eval_order, load
from finetune.progress import PlainLines


@pytest.fixture
def count_base_loads(monkeypatch):
    calls = []
    real = adapters.load_pretrained

    def counting(path, **kw):
        calls.append(str(path))
        return real(path, **kw)

    monkeypatch.setattr(adapters, "load_pretrained", counting)
    return calls


@pytest.fixture(scope="module")
def three_adapters(tiny_model, tmp_path_factory):
    """Unlike adapters on one base: other targets, a DoRA one, one with modules_to_save."""
    root = tmp_path_factory.mktemp("adapters")
    return [
        random_lora_adapter(root / "a" / "final", tiny_model, seed=1, scale=0.2, target_modules=["q_proj", "v_proj"]),
        random_lora_adapter(root / "b" / "final", tiny_model, seed=2, scale=0.2, use_dora=True),
        random_lora_adapter(root / "c" / "final", tiny_model, seed=3, scale=0.2, target_modules=["down_proj"],
                            modules_to_save=["lm_head"]),
    ]


def _generations(out):
    return {p.name: p.read_text() for p in sorted((out / "generations").glob("*.jsonl"))}


def test_adapters_on_one_base_load_it_once_with_the_scores_of_separate_loads(
        tiny_model, three_adapters, tmp_path, count_base_loads, capsys):
    models = [str(three_adapters[0]), "base", str(three_adapters[1]), str(three_adapters[2])]
    shared = evaluate("tiny", models, tmp_path / "shared", device="cpu", show=True, n=3)
    assert count_base_loads == [str(tiny_model)]  # one load for the base column and all three adapters
    out = capsys.readouterr().out
    assert out.count("on the base already loaded") == 3

    separate = {}
    for m in models:  # one checkpoint per run: the base loads afresh each time
        card = evaluate("tiny", [m], tmp_path / f"alone-{len(separate)}", device="cpu", show=False, n=3,
                        base_model=str(tiny_model))
        separate.update(card["scores"])
        for p in (tmp_path / f"alone-{len(separate) - 1}" / "generations").glob("*.jsonl"):
            assert p.read_text() == (tmp_path / "shared" / "generations" / p.name).read_text(), p.name
    assert len(count_base_loads) == 1 + 4
    assert shared["scores"] == separate  # identical, not approximately equal
    assert [m["name"] for m in shared["models"]] == list(shared["scores"]) == list(separate)
    assert len(_generations(tmp_path / "shared")) == 4


def test_eval_order_puts_the_shared_base_before_its_adapters():
    ck = [Checkpoint("a", "/a", "adapter", "/base"), Checkpoint("m", "/merged", "model"),
          Checkpoint("base", "/base", "base"), Checkpoint("b", "/b", "adapter", "/base")]
    assert [c.name for c in eval_order(ck)] == ["m", "base", "a", "b"]


def test_loader_reloads_for_another_model_and_after_release(tiny_model, tiny_adapter, count_base_loads):
    loader = Loader("cpu", __import__("torch").float32)
    a = Checkpoint("a", str(tiny_adapter), "adapter", str(tiny_model))
    loader.load(a)
    assert loader.reuses_base(a)
    loader.load(Checkpoint("m", str(tiny_model), "model"))  # a plain model: the adapters are gone
    assert loader.reuses_base(a)
    loader.release()
    assert not loader.reuses_base(a)
    model, _ = loader.load(a)
    assert len(count_base_loads) == 3
    fresh, _ = load(a, "cpu", __import__("torch").float32)
    assert list(model.peft_config) == ["adapter2"] and list(fresh.peft_config) == ["default"]


def test_eval_prints_progress_lines_off_a_terminal(tiny_adapter, tmp_path, capsys):
    evaluate("tiny", ["base", str(tiny_adapter)], tmp_path / "ev", device="cpu", show=True)
    lines = capsys.readouterr().out.splitlines()
    for phase in ("qa loss", "qa generate", "mc choices"):
        done = [x for x in lines if x.startswith(f"[eval] {phase}: ")]
        assert done, phase
        assert (" options/s  eta " if "choices" in phase else " rows/s  eta ") in done[-1]
    assert any(x.startswith("[eval] qa generate: 6/6 rows") for x in lines)
    assert not any("\r" in x for x in lines)  # no bar redraws in the log


def test_plain_lines_throttle_and_eta(capsys):
    p = PlainLines(100, "[eval] t: ", "rows", every_s=3600)
    for done in (10, 20, 100):
        p.update(done)
    lines = capsys.readouterr().out.splitlines()
    assert [x.split("  ")[0] for x in lines] == ["[eval] t: 10/100 rows", "[eval] t: 100/100 rows"]
    assert PlainLines(100, "step ", start=50).line(60, 5.0, "loss 1.0") == "step 60/100  loss 1.0  eta 20s"
    assert PlainLines(10, "x ", "rows").line(4, 2.0) == "x 4/10 rows  2.0 rows/s  eta 3s"
