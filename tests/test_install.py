"""The built wheel works outside the checkout: recipes, dataset cards and eval suites are found.

A non-editable install once looked for dataset cards in site-packages/datasets, which is Hugging
Face's `datasets` package, so `finetune data` failed there while every test in the checkout passed.
This builds the wheel, installs it into a fresh virtual environment whose other packages are this
environment's (linked, so nothing is downloaded and `datasets` sits beside `finetune` as in a real
install), and runs the commands from another directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "finetune", "recipes", "datasets", "eval")


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """bin/ of a fresh venv holding the wheel built from a copy of the sources."""
    if shutil.which("pip", path=os.path.dirname(sys.executable)) is None and \
            subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode:
        pytest.skip("pip is not available to build and install the wheel")
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    for name in SOURCES:  # a copy: building in the checkout would leave build/ behind
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "_resources"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(p, src / name)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"),
         str(src)], cwd=root)
    wheel = next((root / "dist").glob("finetune-*.whl"))

    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root)
    py = venv / "bin" / "python"
    site = Path(run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).stdout.strip())
    ours = Path(sysconfig.get_paths()["purelib"])
    for entry in ours.iterdir():  # every dependency, but not this checkout's (editable) finetune
        if not entry.name.startswith(("finetune", "__editable__", "__pycache__")):
            (site / entry.name).symlink_to(entry)
    run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        cwd=root)
    return venv / "bin"


def finetune_cli(bin_dir: Path, cwd: Path, *args: str) -> str:
    env = {**os.environ, "FINETUNE_CACHE": str(cwd / "cache"), "PYTHONPATH": "", "COLUMNS": "400"}
    return run([str(bin_dir / "finetune"), *args], cwd=cwd, env=env).stdout


def test_installed_wheel_finds_recipes_cards_and_suites(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([str(installed / "python"), "-c", "import finetune; print(finetune.__file__)"], cwd=elsewhere).stdout
    assert str(REPO) not in where and "site-packages" in where  # the wheel, not the checkout

    recipes = finetune_cli(installed, elsewhere, "recipes")
    assert "tiny-lora" in recipes and "qlora-7b-alpaca" in recipes

    preview = finetune_cli(installed, elsewhere, "data", "recipe=tiny-lora", "n=1")
    assert "datasets/samples/alpaca_sample.json" in preview.replace("\\", "/")  # the card's sample, shipped
    assert "packing efficiency" in preview

    suites = run([str(installed / "python"), "-c",
                  "from finetune.resources import list_resources; print(list_resources('eval'))"], cwd=elsewhere).stdout
    assert "tiny" in suites and "demo" in suites
