"""`finetune` command line: parse, dispatch, and turn every failure into one line + exit code.

    finetune recipe=NAME|PATH [section.key=value ...] [--print_config]   train
    finetune recipes                                                     list recipes
    finetune data|eval|merge|moe|plan|export [key=value ...]             the other stages

No logic lives here: sub-command NAME is `finetune.commands.NAME` (finetune.commands lists them),
its `Args` dataclass (field docstrings are its `--help`) and `run(args, cfg)`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional

from jsonargparse import DefaultHelpFormatter

from finetune.commands import COMMANDS, module_name
from finetune.config import Config, load_config, to_yaml
from finetune.errors import FinetuneError, UsageError, did_you_mean
from finetune.fs import cache_error
from finetune.progress import interrupted_line
from finetune.resources import find_resource, list_resources, read_yaml_mapping
from finetune.typed import build, field_paths, make_parser, split_overrides

FLAGS = ["--help", "-h", "--print_config", "--debug"]

USAGE = """finetune recipe=NAME|PATH [section.key=value ...] [--print_config] [--debug]
       finetune recipes
       finetune {data,eval,merge,moe,plan,export} [key=value ...] [--help]"""

ABOUT = """\
Train with a recipe (a YAML file in recipes/ or a path), overriding any field with dotted
key=value pairs; values are YAML (3, 1e-4, true, null, [q_proj,v_proj]).

commands:
  (default)  train: finetune recipe=tiny-lora out_dir=/tmp/run train.max_steps=4
  recipes    list the recipes with a one-line description
""" + "".join(f"  {name:<10} {desc}\n" for name, desc in COMMANDS.items()) + """
flags:
  --print_config   print the fully resolved config as YAML and exit
  --debug          show the full traceback on errors

A section (model, data, ...) also takes a YAML file or mapping: model={name: tiny}."""

KEYS_NOTE = "\n\nThe keys below are listed as --key VALUE: type them as key=value (--key=value works too)."
RECIPE_NOTE = "\nAny training config key (see `finetune --help`) can be overridden too, e.g. data.seq_len=1024."


class HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, keeping the line breaks of our description."""


def print_help(cls: type, usage: str, description: str) -> None:
    print(make_parser(cls, usage=usage, description=description + KEYS_NOTE,
                      formatter_class=HelpFormatter).format_help())


def split_args(argv: list[str]) -> tuple[list[str], set[str]]:
    flags = {a for a in argv if a.startswith("-") and "=" not in a}
    return [a for a in argv if a not in flags], flags


def run_command(command: str, argv: list[str], wants_help: bool) -> int:
    """A sub-command: its `Args` from key=value pairs; the rest override its recipe, if it has one."""
    if command not in COMMANDS:
        raise UsageError(f"unknown command '{command}'{did_you_mean(command, [*COMMANDS, 'recipes'])}")
    about = COMMANDS[command]
    module = importlib.import_module(module_name(command))  # only now: most commands load torch
    own_keys = field_paths(module.Args)
    takes_recipe = "recipe" in own_keys
    if wants_help:
        print_help(module.Args, f"finetune {command} [key=value ...]", about + (RECIPE_NOTE if takes_recipe else ""))
        return 0
    pairs = split_overrides(argv)
    own = {k: v for k, v in pairs.items() if k.removesuffix("+") in own_keys or not takes_recipe}
    args = build(module.Args, own)
    cfg = load_config(args.recipe, {k: v for k, v in pairs.items() if k not in own}) if takes_recipe else None
    return int(module.run(args, cfg) or 0)


def print_recipes() -> None:
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
    unknown_flags = sorted(flags - set(FLAGS))
    if unknown_flags:
        raise UsageError(f"unknown option {unknown_flags[0]}{did_you_mean(unknown_flags[0], FLAGS)}")
    wants_help = bool(flags & {"--help", "-h"})
    command = argv[0] if argv and "=" not in argv[0] else None
    if command == "recipes":
        print_recipes()
        return 0
    if command is not None:
        return run_command(command, argv[1:], wants_help)
    if wants_help:
        print_help(Config, USAGE, ABOUT)
        return 0
    pairs = split_overrides(argv)
    recipe = pairs.pop("recipe", None)
    if recipe is None and "--print_config" not in flags:
        raise UsageError("no recipe given: finetune recipe=NAME [key=value ...]; `finetune recipes` lists them")
    cfg = load_config(recipe, pairs)
    if "--print_config" in flags:
        print(to_yaml(cfg), end="")
        return 0
    from finetune import train  # here, not at the top: only training loads torch

    train(cfg)
    return 0


def _one_line(e: BaseException) -> str:
    """The first non-empty line of an error: library messages (e.g. torch's state-dict size
    mismatches) can run to hundreds of lines, and the promise is one line (--debug shows all)."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    if not lines:
        return type(e).__name__
    return lines[0] + (f" [+{len(lines) - 1} more lines; --debug shows them]" if len(lines) > 1 else "")


def _unexpected(e: Exception) -> str:
    """An exception no check turned into a FinetuneError: the machine's refusal (disk full, no
    permission, out of memory) in words, anything else as a bug to report, never a bare type name."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}{f': {e.filename}' if e.filename else ''} (--debug shows the traceback)"
    if isinstance(e, MemoryError):
        return "out of memory (MemoryError); use a smaller model, batch or data.seq_len"
    return (f"internal error, please report it with the command you ran: {type(e).__name__}: {_one_line(e)} "
            "(--debug shows the traceback)")


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FINETUNE_DEBUG") == "1"
    try:
        code = run(argv)
        sys.stdout.flush()  # here, so a reader that left early is handled below, not at exit
    except FinetuneError as e:
        if debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print(interrupted_line(), file=sys.stderr)
        code = 130
    except BrokenPipeError:  # `finetune recipes | head`: the reader left; nothing went wrong here
        # Python would report the failed flush of stdout at exit; point it at devnull instead.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except Exception as e:  # not a refusal of ours: still one line, worded as what it is
        if debug:
            raise
        cache_problem = cache_error(e)  # e.g. an unwritable HOME: a setting to change, not a bug
        if cache_problem:
            print(f"error: {cache_problem}", file=sys.stderr)
            sys.exit(2)
        print(f"error: {_unexpected(e)}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
