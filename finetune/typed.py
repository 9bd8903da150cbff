"""Typed settings from what users write: `key=value` arguments and YAML mappings -> dataclasses.

One path for every settings file and command line (recipes, sub-command arguments, eval suites,
MoE configs, dataset cards), so each gets the same messages: an unknown key with did-you-mean, the
allowed set for a bad enumerated value, a wrong type in words, a value out of its declared range
(finetune.ranges), each one line naming where the input came from. Parsing and type checking are
jsonargparse's (`key=value` becomes its `--key=value`); field docstrings are the `--help` text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
import typing
from dataclasses import field
from typing import Any, Literal, Optional, Union

import yaml
from jsonargparse import ArgumentError, ArgumentParser, Namespace, set_parsing_settings

from finetune.errors import UsageError, did_you_mean
from finetune.ranges import check_ranges

set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docstrings are the help

ITEM_LABEL = "finetune.item"


def items(label: str) -> Any:
    """A list-of-dataclasses field (a suite's tasks, a MoE's experts) whose items messages name by
    `label`: 'task {n}' counts from 1, 'experts[{i}]' from 0. Each item is checked as its class."""
    return field(default_factory=list, metadata={ITEM_LABEL: label})


def _item_fields(cls: type) -> dict[str, tuple[type, str]]:
    """name -> (item class, label) of each list-of-dataclasses field of `cls`."""
    hints, out = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        args = typing.get_args(hints[f.name])
        if typing.get_origin(hints[f.name]) is list and args and dataclasses.is_dataclass(args[0]):
            out[f.name] = (args[0], f.metadata.get(ITEM_LABEL, f.name + "[{i}]"))
    return out


def field_paths(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every settable dotted key of a dataclass -> its type (nested dataclasses are sections;
    fields computed after parsing, `init=False`, are not keys)."""
    hints, out = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(field_paths(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = hints[f.name]
    return out


def choices(tp: Any) -> tuple:
    """The values an enumerated field takes: a Literal's, also inside Optional or list; else ()."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    inner = [a for a in typing.get_args(tp) if a is not type(None)]
    return choices(inner[0]) if typing.get_origin(tp) in (Union, list) and len(inner) == 1 else ()


def check(cls: type, values: dict[str, Any], where: str) -> None:
    """Refuse an unknown key (with did-you-mean) or a value outside an enumerated field's set;
    the items of a list-of-dataclasses field are checked as their class, each named by its label.

    jsonargparse would refuse both, but 4.41 (the newest litgpt allows) reports a bad Literal
    string only as "Cannot take a Union of no types", so the allowed set is named here.
    """
    types, listed = field_paths(cls), _item_fields(cls)
    sections = {k.rsplit(".", 1)[0] for k in types if "." in k}  # `model={...}` or a YAML file
    for key, value in _flatten(values, set(types)).items():
        key = key.removesuffix("+")  # `lora.target_modules+=o_proj` appends (jsonargparse's syntax)
        if key not in types and key not in sections:
            raise UsageError(f"{where}: unknown key '{key}'{did_you_mean(key, types)}")
        nested = typing.get_args(types.get(key))  # a list-of-dataclasses field in a section (data.sources)
        if key not in listed and typing.get_origin(types.get(key)) is list and nested \
                and dataclasses.is_dataclass(nested[0]):
            listed[key] = (nested[0], key + "[{i}]")
        if key in listed:
            _check_items(*listed[key], key, value, where)
            continue
        allowed = choices(types.get(key))
        for v in value if isinstance(value, list) else [value]:
            if allowed and v is not None and v not in allowed:
                raise UsageError(f"{where}: {key} must be one of {', '.join(map(str, allowed))}, got {v!r}")


def _check_items(item_cls: type, label: str, key: str, value: Any, where: str) -> None:
    if value is None:
        return
    if not isinstance(value, list):
        raise UsageError(f"{where}: {key}: expected a list of mappings, got {value!r}")
    for i, item in enumerate(value):
        named = f"{where}: {label.format(i=i, n=i + 1)}"
        if not isinstance(item, dict):
            raise UsageError(f"{named}: expected a mapping like {{key: value}}, got {item!r}")
        check(item_cls, item, named)


def _flatten(d: dict, leaves: set[str], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}; a dict-valued field (data.columns) stays whole, and
    so does an empty mapping (`generaton: {}` is still a key to check)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key not in leaves:
            out.update(_flatten(v, leaves, key + "."))
        else:
            out[key] = v
    return out


# --------------------------------------------------------------------------- key=value arguments


def split_overrides(args: list[str]) -> dict[str, str]:
    """['a.b=1', 'c=[x,y]'] -> {'a.b': '1', 'c': '[x,y]'} with a one-line error for anything else."""
    out = {}
    for a in args:
        key, sep, value = a.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise UsageError(f"expected key=value, got '{a}'")
        if key in out:  # the last would silently win (and a second `+=` drop the first)
            shown, hint = (f"{key}=", f"; append several at once: {key}=[a,b]") if key.endswith("+") else (key, "")
            raise UsageError(f"{shown} is given twice ('{out[key]}' and '{value}'){hint}")
        out[key] = value
    return out


def to_argv(values: dict[str, Any]) -> list[str]:
    """Our key=value in jsonargparse's syntax: {'train.lr': '1e-4'} -> ['--train.lr=1e-4'].
    Values that are not strings (the Python API allows them) go as JSON, which is YAML too."""
    return [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in values.items()]


def parse_value(raw: Any) -> Any:
    """A command-line value as YAML (3, 0.1, true, null, [a,b], {k: v}), for `check`."""
    if not isinstance(raw, str) or raw == "":
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def make_parser(cls: type, **kwargs) -> ArgumentParser:
    """The jsonargparse parser of dataclass `cls`: its fields as --dotted.keys, docstrings as help.
    List-of-dataclasses fields are left to `parse_mapping`, which parses each item on its own so a
    message can say which item is wrong."""
    parser = ArgumentParser(exit_on_error=False, default_env=False, **kwargs)
    parser.add_class_arguments(cls, nested_key=None, as_group=False, fail_untyped=False, skip=set(_item_fields(cls)))
    return parser


_parser = functools.lru_cache(maxsize=None)(make_parser)  # built once per class: ~0.2 s each


@contextlib.contextmanager
def refused_as(where: str):
    """jsonargparse's refusal as one UsageError line (its messages span lines)."""
    try:
        yield
    except ArgumentError as e:
        raise UsageError(f"{where}: {_plain(' '.join(str(e).split()))}") from e


_TYPE_WORDS = {"int": "an integer", "float": "a finite number", "str": "a string", "bool": "true or false",
               "list": "a list like [a,b]", "dict": "a mapping like {key: value}", "NoneType": "null"}


def _plain(message: str) -> str:
    """jsonargparse's 'Parser key "train.lr": Expected a <class 'float'>. Got value: fast' in words:
    'train.lr: expected a finite number, got 'fast''; a Union's refusal names each alternative."""
    m = re.fullmatch(r"Parser key \"([^\"]+)\": Expected a <class '(\w+)'>\. Got value: (.*)", message)
    if m and m.group(2) in _TYPE_WORDS:
        return f"{m.group(1)}: expected {_TYPE_WORDS[m.group(2)]}, got '{m.group(3)}'"
    m = re.fullmatch(r"Parser key \"([^\"]+)\": Unable to load config '(.*?)'.*", message)
    if m:
        return f"{m.group(1)}: expected a mapping like {{key: value}} or a YAML file, got '{m.group(2)}'"
    m = re.fullmatch(r"Parser key \"([^\"]+)\": Does not validate against any of the Union subtypes "
                     r"Subtypes: \[(.*?)\] Errors: .* Given value: (.*)", message)
    if m:
        alternatives = re.findall(r"<class '(\w+)'>|Literal\[([^\]]*)\]", m.group(2))
        words = [_TYPE_WORDS.get(cls, cls) if cls else literal for cls, literal in alternatives]
        return f"{m.group(1)}: expected {' or '.join(words)}, got '{m.group(3)}'"
    return message


def parse_args(cls: type, values: dict[str, Any], where: str, base: Optional[Namespace] = None) -> Namespace:
    """key=value strings (on top of `base`, a recipe's) checked and typed as `cls`, not built yet."""
    check(cls, {k: parse_value(v) for k, v in values.items()}, where)
    with refused_as(where):
        return _parser(cls).parse_args(to_argv(values), namespace=base)


def instantiate(cls: type, ns: Namespace, prefix: str = ""):
    """The dataclass of a parsed namespace, its fields' ranges checked (messages start `prefix`)."""
    init = _parser(cls).instantiate_classes(ns)  # nested sections come back as dataclasses
    obj = cls(**{f.name: init[f.name] for f in dataclasses.fields(cls) if f.init and f.name in init})
    check_ranges(obj, prefix)  # every built config, file and sub-command Args: the ranges its fields declare
    return obj


def build(cls: type, values: dict[str, Any], where: str = "command line"):
    """Dataclass `cls` from dotted key=value strings, parsed and type-checked by jsonargparse."""
    return instantiate(cls, parse_args(cls, values, where))


# --------------------------------------------------------------------------- YAML mappings


def read_mapping(cls: type, data: dict, where: str) -> Namespace:
    """A mapping from a file the user wrote, checked and typed as `cls` but not built (a recipe:
    key=value overrides go on top). `where` starts each message: 'recipe PATH'."""
    check(cls, data, where)
    return _typed(cls, data, where)


def parse_mapping(cls: type, data: dict, where: str):
    """A mapping from a file the user wrote -> dataclass `cls`: keys, choices, types and ranges
    checked as a recipe's are, each item of a list-of-dataclasses field as its own class. A null
    for a field that cannot be null means its default. Rules across fields are the caller's."""
    check(cls, data, where)
    return _built(cls, data, where)


def _typed(cls: type, data: dict, where: str) -> Namespace:
    with refused_as(where):
        return _parser(cls).parse_object({k: v for k, v in data.items() if k not in _item_fields(cls)})


def _built(cls: type, data: dict, where: str):
    obj = instantiate(cls, _typed(cls, _nulls_as_defaults(cls, data), where), f"{where}: ")
    for name, (item_cls, label) in _item_fields(cls).items():
        if data.get(name) is not None:
            setattr(obj, name, [_built(item_cls, item, f"{where}: {label.format(i=i, n=i + 1)}")
                                for i, item in enumerate(data[name])])
    return obj


def _nulls_as_defaults(cls: type, data: dict) -> dict:
    """`key: null` dropped where the field's type has no None (jsonargparse would store the None)."""
    hints, out = typing.get_type_hints(cls), {}
    for k, v in data.items():
        tp = hints.get(k)
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            v = _nulls_as_defaults(tp, v)
        elif v is None and tp is not None and type(None) not in typing.get_args(tp) and tp is not Any:
            continue
        out[k] = v
    return out
