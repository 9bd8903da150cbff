"""data.sources: several data sets in one run, each read with its own settings, mixed by weight
or concatenated, counted per source, cached per source."""

import json

import pytest

from finetune.config import DataConfig, DataSource, load_config
from finetune.data.mix import prepare_data
from finetune.errors import UsageError


def _alpaca(path, n, word):
    path.write_text(json.dumps([{"instruction": f"{word} {i}?", "input": "", "output": f"{word} answer {i}."}
                                for i in range(n)]))
    return str(path)


def _sharegpt(path, n, word):
    path.write_text("\n".join(json.dumps({"conversations": [{"from": "human", "value": f"{word} {i}?"},
                                                             {"from": "gpt", "value": f"{word} reply {i}."}]})
                              for i in range(n)))
    return str(path)


@pytest.fixture
def files(tmp_path):
    return _alpaca(tmp_path / "a.json", 30, "alpha"), _sharegpt(tmp_path / "b.jsonl", 10, "beta")


def _cfg(files, mix="weight", wa=3.0, wb=1.0, **kw):
    a, b = files
    return DataConfig(seq_len=128, val_fraction=0.1, mix=mix, sources=[
        DataSource(path=a, format="alpaca", weight=wa),
        DataSource(path=b, format="sharegpt", weight=wb, system_prompt="BETA-SYSTEM"), ], **kw)


def _texts(units, tok):
    return [tok.decode(units[i]["input_ids"]) for i in range(len(units))]


def test_weights_set_each_sources_share(files, tok):
    bundle = prepare_data(_cfg(files), tok, seed=1)
    st = bundle.stats
    a, b = st.sources
    assert (a["examples"], b["examples"]) == (27, 9)  # 10% held out of each
    assert a["used"] + b["used"] == 36 and (a["used"], b["used"]) == (27, 9)  # 3:1 of 36
    bundle = prepare_data(_cfg(files, wa=1.0, wb=1.0), tok, seed=1)
    a, b = bundle.stats.sources
    assert (a["used"], b["used"]) == (18, 18)  # the small source repeated, the large one subsampled
    assert bundle.stats.examples == 36 and bundle.stats.val_examples == 4
    text = "".join(_texts(bundle.train, tok))
    assert text.count("beta reply") == 18 and text.count("alpha answer") == 18


def test_concat_takes_every_example_once(files, tok):
    bundle = prepare_data(_cfg(files, mix="concat", wa=5.0), tok, seed=1)
    assert [s["used"] for s in bundle.stats.sources] == [27, 9] and bundle.stats.examples == 36


def test_each_source_keeps_its_own_settings(files, tok):
    text = _texts(prepare_data(_cfg(files, mix="concat", packing=False), tok, seed=1).train, tok)
    beta = [t for t in text if "beta" in t]
    alpha = [t for t in text if "alpha" in t]
    assert beta and all("BETA-SYSTEM" in t for t in beta)
    assert alpha and not any("BETA-SYSTEM" in t for t in alpha)


def test_cached_per_source_and_stats_name_each(files, tok, tmp_path):
    cfg = _cfg(files)
    first = prepare_data(cfg, tok, seed=1)
    assert not any(s["cached"] for s in first.stats.sources)
    again = prepare_data(_cfg(files, wa=1.0), tok, seed=1)  # another weight: nothing re-read
    assert all(s["cached"] for s in again.stats.sources)
    c = _alpaca(tmp_path / "c.json", 5, "gamma")
    cfg3 = _cfg(files)
    cfg3.sources.append(DataSource(path=c, format="alpaca"))
    third = prepare_data(cfg3, tok, seed=1)
    assert [s["cached"] for s in third.stats.sources] == [True, True, False]
    lines = "\n".join(third.stats.lines())
    assert "3 sources (data.mix=weight)" in lines and "source 3" in lines and "c.json: weight 1" in lines


def test_sources_from_the_command_line(files):
    a, b = files
    cfg = load_config("tiny-lora", {"data.card": "null",
                                    "data.sources": f"[{{path: {a}, format: alpaca, weight: 0.7}}, {{card: sample-sharegpt}}]"})
    assert cfg.data.sources[0].weight == 0.7 and cfg.data.sources[1].card == "sample-sharegpt"


@pytest.mark.parametrize("change,says", [
    ({"card": "sample-alpaca"}, "data.sources replaces data.card and data.path, but data.card is set too"),
    ({"sources": [DataSource(format="alpaca")]}, "data.sources[0]: give card: NAME or path: FILE"),
    ({"sources": [DataSource(path="/nonexistent.json", format="alpaca")]}, "data.sources[0]: "),
])
def test_refusals(files, tok, change, says):
    cfg = _cfg(files)
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(UsageError, match=None) as e:
        prepare_data(cfg, tok, seed=1)
    assert says in str(e.value)


@pytest.mark.parametrize("value,says", [
    ("[{path: a.json, weight: 0}]", "weight must be > 0, got 0"),
    ("[{path: a.json, wieght: 1}]", "unknown key 'wieght'"),
])
def test_bad_source_keys_are_one_line(value, says):
    with pytest.raises(UsageError) as e:
        load_config("tiny-lora", {"data.card": "null", "data.sources": value})
    assert says in str(e.value)


def test_contradiction_refused_when_the_config_is_built():
    with pytest.raises(UsageError, match="data.sources replaces data.card and data.path, but data.card is set too"):
        load_config("tiny-lora", {"data.sources": "[{card: sample-sharegpt}]"})
