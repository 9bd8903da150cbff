"""Where recipes, dataset cards and eval suites are found, and how their YAML is read.

A name is looked up as a path, then in ./KIND/ (the user's own), then in the project's KIND/: the
checkout's folder, or the copy a wheel ships in finetune/_resources/ (setup.py puts it there).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from finetune.errors import UsageError, did_you_mean


def resource_dir(kind: str) -> Path:
    """A top-level project folder (recipes, datasets, eval): the checkout's, else the installed copy.

    A checkout is recognised by its pyproject.toml, not by a sibling folder of the right name: once
    installed, the package's sibling `datasets` is Hugging Face's `datasets` package.
    """
    here = Path(__file__).resolve().parent
    project = here.parent / "pyproject.toml"
    if project.is_file() and 'name = "finetune"' in project.read_text(errors="replace"):
        return here.parent / kind
    return here / "_resources" / kind


def install_hint(extra: str) -> str:
    """How to install an optional extra. From the checkout (`pip install -e '.[export]'` there):
    'finetune' on PyPI is an unrelated package, so `pip install 'finetune[export]'` must never be
    suggested."""
    here = Path(__file__).resolve().parent
    if resource_dir("recipes").parent == here.parent:
        return f"pip install -e '{here.parent}[{extra}]'"
    return f"reinstall finetune from its checkout with the extra: pip install -e 'CHECKOUT[{extra}]'"


def find_resource(kind: str, name: str, suffix: str = ".yaml") -> Path:
    """Look up `name` as a path, then ./KIND/, then the packaged KIND/; raise with close matches."""
    p = Path(os.path.expanduser(name))
    if p.is_file():
        return p
    what = {"recipes": "recipe", "eval": "eval suite", "datasets": "dataset card"}.get(kind, kind)
    if p.is_dir():  # not "not found": it is there, but a folder
        raise UsageError(f"{what} {name} is a folder; give its YAML file (e.g. {p / 'NAME.yaml'}) or a name from {kind}/")
    if p.suffix in (".yaml", ".yml") or os.sep in name:
        raise UsageError(f"{kind[:-1] if kind.endswith('s') else kind} file not found: {name}")
    for folder in (Path.cwd() / kind, resource_dir(kind)):
        cand = folder / f"{name}{suffix}"
        if cand.is_file():
            return cand
    names = list_resources(kind)
    raise UsageError(f"unknown {kind.rstrip('s')} '{name}'{did_you_mean(name, names)}; see `finetune {kind}`"
                     if kind == "recipes" else
                     f"unknown {kind.rstrip('s')} '{name}'{did_you_mean(name, names)}")


def list_resources(kind: str) -> list[str]:
    names = set()
    for folder in (Path.cwd() / kind, resource_dir(kind)):
        if folder.is_dir():
            names.update(p.stem for p in folder.glob("*.yaml"))
    return sorted(names)


def read_user_text(path: Path, what: str) -> str:
    """A text file the user named (recipe, suite, data): one line for each way reading it fails."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")  # a byte order mark is not part of the text
    except PermissionError:
        raise UsageError(f"cannot read {what} {path}: permission denied") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} {path} is not UTF-8 text (byte {e.start}): is it the right file?") from None
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror}") from None


def read_yaml_mapping(path: Path, what: str) -> dict:
    """Read a YAML file that must hold a mapping; one-line errors for every way it can fail."""
    text = read_user_text(path, what)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UsageError(f"{what} {path}{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"{what} {path} must be a YAML mapping of keys to values, got {type(data).__name__}")
    return data
