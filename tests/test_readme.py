"""The README runs as written: its shell (and Python) blocks, top to bottom, in a scratch folder.

A block is skipped only when the line before its fence says so with an HTML comment,
`<!-- readme-test: skip (why) -->` (a GPU, installing packages, the minutes-long demo). Commands
run in a scratch copy of the checkout's layout (recipes/, eval/, examples/, ... linked), `/tmp/`
paths go to a scratch tmp/, `finetune` is this checkout's CLI, and `. .venv/bin/activate` lines
are left out (the tests already run in the environment). A line using `../shared` data runs only
where that folder exists. Slow (every tiny training the README shows, a measured plan step).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"(?P<skip><!-- readme-test: skip[^>]*-->[ \t]*\n)?```(?P<lang>bash|python)\n(?P<code>.*?)```", re.S)


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """(lang, code) of every bash/python block not marked to skip, in order."""
    return [(m["lang"], m["code"]) for m in FENCE.finditer(text) if not m["skip"]]


def shell_commands(code: str) -> list[str]:
    """A bash block's commands: continuation lines joined, comments and venv activation left out."""
    joined = re.sub(r"[ \t]*\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.startswith(". .venv/bin/activate"):
            continue
        out.append(line)
    return out


def test_the_extractor_honours_skip_markers():
    text = ("<!-- readme-test: skip (gpu) -->\n```bash\nfinetune gpu\n```\n\n```bash\n. .venv/bin/activate\n"
            "finetune a \\\n    b=1   # note\n# only a comment\n```\n```python\nprint(1)\n```\n```\nnot run\n```\n")
    blocks = readme_blocks(text)
    assert blocks == [("bash", ". .venv/bin/activate\nfinetune a \\\n    b=1   # note\n# only a comment\n"),
                      ("python", "print(1)\n")]
    assert shell_commands(blocks[0][1]) == ["finetune a b=1   # note"]


@pytest.mark.slow
def test_readme_blocks_run_in_order(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("recipes", "eval", "examples", "datasets", "scripts", "bench", "docs"):
        (root / name).symlink_to(REPO / name)
    shared = REPO.parent / "shared"
    if shared.is_dir():
        (tmp_path / "shared").symlink_to(shared)
    scratch_tmp = tmp_path / "tmp"
    scratch_tmp.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", COLUMNS="200")
    cli = f'finetune() {{ "{sys.executable}" -m finetune.cli "$@"; }}\n'
    ran = 0
    for lang, code in readme_blocks((REPO / "README.md").read_text()):
        code = code.replace("/tmp/", f"{scratch_tmp}/")
        if lang == "python":
            steps = [[sys.executable, "-c", code]]
        else:
            steps = [["bash", "-c", cli + c] for c in shell_commands(code)
                     if "../shared" not in c or (tmp_path / "shared").is_dir()]
        for argv in steps:
            r = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, f"README command failed ({r.returncode}): {argv[-1]}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
            ran += 1
    assert ran >= 20
