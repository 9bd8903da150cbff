"""Reading files as they are: split files chosen as `datasets` does, CSV cells as text, a BOM."""

import json

import pytest

from finetune.config import DataConfig
from finetune.data.pipeline import load_conversations, prepare
from finetune.errors import UsageError


def rows(tag, n=2):
    return [{"instruction": f"{tag}{k}", "output": f"o{k}"} for k in range(n)]


def folder(tmp_path, files: dict):
    d = tmp_path / "f"
    for name, content in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return d


def instructions(path, **kw):
    convs, stats = load_conversations(DataConfig(path=str(path), format="alpaca", val_fraction=0.0, **kw))
    return sorted(c.messages[0]["content"] for c in convs), stats


def test_test_and_validation_files_are_never_training_data(tmp_path):
    d = folder(tmp_path, {"data.json": rows("d"), "test.json": rows("t"), "validation.json": rows("v")})
    with pytest.raises(UsageError, match=r"no 'train' files .*validation.*test.*data\.data_files"):
        instructions(d)
    got, stats = instructions(d, data_files="data.json")  # said explicitly: read
    assert got == ["d0", "d1"] and stats.files == [str(d / "data.json")]


@pytest.mark.parametrize("train_name, test_name", [("train.json", "test.json"), ("my-train-00000.jsonl", "test.json"),
                                                   ("train/part.json", "test/part.json")])
def test_split_files_matched_like_datasets(tmp_path, train_name, test_name):
    content = rows("r") if train_name.endswith(".json") else "\n".join(map(json.dumps, rows("r")))
    d = folder(tmp_path, {train_name: content, test_name: rows("t"), "dev.json": rows("v")})
    got, stats = instructions(d)
    assert got == ["r0", "r1"] and stats.files == [str(d / train_name)]
    assert instructions(d, split="test")[0] == ["t0", "t1"]


def test_folder_without_split_names_reads_every_file_and_says_which(tmp_path):
    d = folder(tmp_path, {"a.json": rows("a", 1), "b.json": rows("b", 1), "README.md": "# not data"})
    got, stats = instructions(d)
    assert got == ["a0", "b0"] and stats.files == [str(d / "a.json"), str(d / "b.json")]
    assert "files read" in str(stats) and "b.json" in str(stats)
    with pytest.raises(UsageError, match="matches no file"):
        instructions(d, data_files=["nope-*.json"])


def test_csv_cells_are_text(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text('instruction,input,output\nSay none,,None\nSay null,N/A,null\nCount,,7\n"Two,\nlines",x,42\n')
    convs, stats = load_conversations(DataConfig(path=str(p), format="alpaca", val_fraction=0.0))
    got = {c.messages[0]["content"]: c.messages[1]["content"] for c in convs}
    assert got == {"Say none": "None", "Say null\n\nN/A": "null", "Count": "7", "Two,\nlines\n\nx": "42"}
    assert stats.dropped == {}


def test_utf8_bom_is_accepted(tmp_path, tok):
    bom = "\ufeff"
    (tmp_path / "a.jsonl").write_text(bom + "\n".join(map(json.dumps, rows("j"))), encoding="utf-8")
    (tmp_path / "b.json").write_text(bom + json.dumps(rows("k")), encoding="utf-8")
    (tmp_path / "c.csv").write_text(bom + "instruction,output\nc0,o0\n", encoding="utf-8")
    for name, first in (("a.jsonl", "j0"), ("b.json", "k0"), ("c.csv", "c0")):
        got, stats = instructions(tmp_path / name)
        assert got[0] == first and stats.dropped == {}, name
    assert prepare(DataConfig(path=str(tmp_path / "a.jsonl"), format="alpaca", val_fraction=0.0), tok, seed=0,
                   progress=False).stats.examples == 2


def test_hub_dataset_revision_is_pinned_online_and_noted_offline(monkeypatch):
    from types import SimpleNamespace

    import huggingface_hub
    import huggingface_hub.constants

    from finetune.data.sources import Source, pin_revision

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, repo: SimpleNamespace(sha="abc123"))
    src = Source(format="alpaca", hub_id="someone/data")
    before = src.fingerprint()
    assert "abc123" in pin_revision(src) and src.revision == "abc123"
    assert src.fingerprint() != before  # a new commit on the hub is a new cache key
    assert pin_revision(Source(format="alpaca", hub_id="someone/data", revision="v1")) is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = Source(format="alpaca", hub_id="someone/data")
    assert "local copy" in pin_revision(offline) and offline.revision is None
