"""`finetune` command line: parse, dispatch, and turn every failure into one line + exit code.

    finetune recipe=NAME|PATH [section.key=value ...] [--print_config]   train
    finetune recipes                                                     list recipes
    finetune data|eval|merge|moe|plan [key=value ...]                    the other stages

No logic lives here: each sub-command is `run(args, cfg)` in its own module, with an `Args`
dataclass whose field docstrings are its `--help`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import sys
from typing import Optional

from finetune.errors import FinetuneError, UsageError, did_you_mean

# name -> (module, one-line description). Each module defines `Args` and `run(args, cfg)`.
COMMANDS = {
    "data": ("finetune.preview", "preview rendered examples and data statistics for a recipe"),
    "eval": ("finetune.eval.run", "score base models, adapters, merged and MoE checkpoints on a suite"),
    "merge": ("finetune.merge", "merge an adapter into its base, or combine several adapters"),
    "moe": ("finetune.moe.command", "assemble a Mixtral-style MoE from fine-tunes; routing report"),
    "plan": ("finetune.plan.command", "predict peak GPU memory for a recipe, and what fits a budget"),
}

USAGE = """\
usage: finetune recipe=NAME|PATH [section.key=value ...] [--print_config] [--debug]
       finetune recipes
       finetune {data,eval,merge,moe,plan} [key=value ...] [--help]

Train with a recipe (a YAML file in recipes/ or a path), overriding any field with dotted
key=value pairs; values are YAML (3, 1e-4, true, null, [q_proj,v_proj]).

commands:
  (default)  train: finetune recipe=tiny-lora out_dir=/tmp/run train.max_steps=4
  recipes    list the recipes with a one-line description
""" + "".join(f"  {name:<10} {desc}\n" for name, (_, desc) in COMMANDS.items()) + """
options:
  --help           this help (with every config key below)
  --print_config   print the fully resolved config as YAML and exit
  --debug          show the full traceback on errors
"""


def help_for(cls: type, title: str) -> str:
    """Field docs of a dataclass, rendered by jsonargparse, shown in key=value syntax."""
    from jsonargparse import ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog="finetune", exit_on_error=False)
    parser.add_class_arguments(cls, nested_key=None, fail_untyped=False)
    text = parser.format_help()
    body = text.split("\n\n", 1)[1] if "\n\n" in text else text
    lines = []
    for line in body.splitlines():
        if "Path to a configuration file" in line or line.strip().startswith(("-h, --help", "Show this help")):
            continue
        if re.match(r"^\S.*\(.*\):$", line):  # group header "ModelConfig(name: ...):" -> "[model]"
            lines.append("")
            continue
        line = re.sub(r"^(\s+)--([\w.]+) (\{[^}]*\}|[A-Z_]+)", r"\1\2=\3", line)
        lines.append(line)
    return f"{title}\n" + "\n".join(lines).strip("\n") + "\n"


def split_args(argv: list[str]) -> tuple[list[str], set[str]]:
    flags = {a for a in argv if a.startswith("--") and "=" not in a}
    return [a for a in argv if a not in flags], flags


def parse_command(args_cls: type, argv: list[str], takes_recipe: bool):
    """Split key=value pairs between the command's own `Args` and (if it has a recipe) the config."""
    from finetune.config import (
        build,
        field_paths,
        load_config,
        parse_value,
        split_overrides,
    )

    pairs = split_overrides(argv)
    own_keys = set(field_paths(args_cls))
    own = {k: parse_value(v) for k, v in pairs.items() if k in own_keys}
    rest = {k: v for k, v in pairs.items() if k not in own_keys}
    cfg = None
    if takes_recipe:
        recipe = own.get("recipe")
        cfg = load_config(str(recipe) if recipe else None, rest)
    elif rest:
        key = next(iter(rest))
        raise UsageError(f"unknown key '{key}'{did_you_mean(key, own_keys)}")
    return build(args_cls, own, where="command line"), cfg


def print_recipes() -> None:
    from finetune.resources import find_resource, list_resources, read_yaml_mapping

    names = list_resources("recipes")
    width = max(map(len, names), default=0)
    for name in names:
        try:
            desc = read_yaml_mapping(find_resource("recipes", name), "recipe").get("description", "")
        except UsageError as e:
            desc = f"(unreadable: {e})"
        print(f"{name:<{width}}  {str(desc).splitlines()[0] if desc else ''}")


def run(argv: list[str]) -> int:
    argv, flags = split_args(argv)
    unknown_flags = flags - {"--help", "--print_config", "--debug", "-h"}
    if unknown_flags:
        flag = sorted(unknown_flags)[0]
        raise UsageError(f"unknown option {flag}{did_you_mean(flag, ['--help', '--print_config', '--debug'])}")
    wants_help = "--help" in flags or "-h" in argv
    argv = [a for a in argv if a != "-h"]
    command = argv[0] if argv and "=" not in argv[0] else None

    if command == "recipes":
        print_recipes()
        return 0
    if command is not None:
        if command not in COMMANDS:
            raise UsageError(f"unknown command '{command}'{did_you_mean(command, [*COMMANDS, 'recipes'])}")
        module = importlib.import_module(COMMANDS[command][0])
        args_cls = module.Args
        takes_recipe = any(f.name == "recipe" for f in dataclasses.fields(args_cls))
        if wants_help:
            print(help_for(args_cls, f"usage: finetune {command} [key=value ...]\n\n{COMMANDS[command][1]}\n"))
            if takes_recipe:
                print("Any training config key (see `finetune --help`) can be overridden too.")
            return 0
        args, cfg = parse_command(args_cls, argv[1:], takes_recipe)
        return int(module.run(args, cfg) or 0)

    from finetune.config import Config, load_config, split_overrides, to_yaml

    if wants_help:
        print(USAGE)
        print(help_for(Config, "config keys (recipe fields):"))
        return 0
    pairs = split_overrides(argv)
    recipe = pairs.pop("recipe", None)
    if recipe is None and "--print_config" not in flags:
        raise UsageError("no recipe given: finetune recipe=NAME [key=value ...]; `finetune recipes` lists them")
    cfg = load_config(recipe, pairs)
    if "--print_config" in flags:
        print(to_yaml(cfg), end="")
        return 0
    from finetune import train

    train(cfg)
    return 0


def _one_line(e: BaseException) -> str:
    """The first non-empty line of an error: library messages (e.g. torch's state-dict size
    mismatches) can run to hundreds of lines, and the promise is one line (--debug shows all)."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    if not lines:
        return type(e).__name__
    return lines[0] + (f" [+{len(lines) - 1} more lines; --debug shows them]" if len(lines) > 1 else "")


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FINETUNE_DEBUG") == "1"
    try:
        code = run(argv)
    except FinetuneError as e:
        if debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except Exception as e:  # an unexpected bug still gets one line (and a hint to see more)
        if debug:
            raise
        print(f"error: {type(e).__name__}: {_one_line(e)} (run with --debug for the traceback)", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
