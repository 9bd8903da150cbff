"""docs/preference.md's renderings are what the code renders: each `<!-- render {...} -->` marker is
followed by a ```json row and a ```text block, regenerated here with the tiny tokenizer's ChatML
template (or the prompt style the marker names) and compared.

    python tests/data/test_preference_docs.py     # rewrite the text blocks after a deliberate change
"""

import json
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "preference.md"
BLOCK = re.compile(r"(<!-- render (\{.*?\}) -->\n```json\n(.*?)\n```\n```text\n)(.*?)(```)", re.S)


def render(row: dict, opts: dict) -> str:
    from finetune.config import DataConfig
    from finetune.data.dump import pref_record
    from finetune.data.preference import prepare_preference
    from finetune.models.tiny import byte_tokenizer

    tok = byte_tokenizer()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rows.jsonl"
        path.write_text(json.dumps(row) + "\n")
        cfg = DataConfig(path=str(path), format=opts.get("format"), columns=opts.get("columns", {}),
                         val_fraction=0.0, seq_len=opts.get("seq_len", 512), cache=False,
                         prompt_style=opts.get("prompt_style", "auto"))
        bundle = prepare_preference(cfg, tok, paired=opts.get("paired", True), seed=0, progress=False)
    out = []
    for unit in bundle.train:
        rec = pref_record(tok, unit)
        out.append(f"-- prompt ({len(unit['prompt_ids'])} tokens, context) --\n{rec['prompt']}")
        for side in ("chosen", "rejected", "completion"):
            if side in rec:
                label = f", label {str(rec['label']).lower()}" if side == "completion" else ""
                out.append(f"-- {side} ({len(unit[side + '_ids'])} tokens, count{label}) --\n{rec[side]}")
    return "\n".join(out) + "\n"


def regenerate(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render(json.loads(m.group(3)), json.loads(m.group(2))) + m.group(5), text)


def test_doc_renderings_are_current(monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    text = DOC.read_text()
    assert len(BLOCK.findall(text)) >= 9
    assert regenerate(text) == text, "docs/preference.md is stale: run python tests/data/test_preference_docs.py"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    DOC.write_text(regenerate(DOC.read_text()))
