"""``memckpt config``: show the config a recipe, a YAML file and overrides produce; list recipes."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["handler", "register"]

_SHOW_EPILOG = """\
overrides (applied after the YAML file):
  key=value     set an existing key              train.steps=50
  +key=value    add a key to a dict field        +logger.tags.team=infra
  ++key=value   set, adding it if missing        ++logger.tags.team=infra
  ~key          reset to the default / remove    ~optimizer.lr
values in Hydra's grammar (hydra-core parses them): 5, 3e-4, true, null, [1, 2],
{interval: 5}, 'quoted'; commas make a sweep, which is refused: quote the value
inside the argument, "logger.tags.team='a,b'"
"""


def register(subparsers: Any) -> None:
    """Add ``config show`` and ``config list`` to the ``memckpt`` parser."""
    parser = subparsers.add_parser(
        "config", help="show the config of a recipe with a YAML file and overrides"
    )
    sub = parser.add_subparsers(dest="config_command", required=True, metavar="{show,list}")
    show = sub.add_parser(
        "show",
        help="print the merged config as YAML",
        description="Print the config of RECIPE, with --yaml FILE merged on top, then the "
        "overrides; precedence recipe < YAML < overrides.",
        epilog=_SHOW_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument(
        "recipe", help="a recipe name (memckpt config list) or package.module:function"
    )
    # REMAINDER, then a second parse in the handler: argparse cannot otherwise take options
    # between the positional overrides (`show gpt_tiny --yaml run.yaml train.steps=5`).
    show.add_argument(
        "overrides", nargs=argparse.REMAINDER, metavar="OVERRIDE", help="key=value, +key=value, "
        "++key=value or ~key"
    )  # fmt: skip
    _add_show_options(show)
    show.set_defaults(fn=handler, config_parser=show)
    lister = sub.add_parser("list", help="list the registered recipes")
    lister.add_argument("--json", action="store_true", help="a JSON list of {name, doc}")
    lister.set_defaults(fn=handler)


def _add_show_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--yaml", metavar="FILE", help="a YAML file merged on top of the recipe")
    parser.add_argument("--json", action="store_true", help="print JSON instead of YAML")


def handler(args: argparse.Namespace) -> int:
    """Run ``config show`` or ``config list``; errors are ``ConfigError`` (exit 2 in the cli)."""
    from memckpt.recipes import RECIPES, build_config, to_dict, to_yaml

    if args.config_command == "list":
        docs = {n: ((RECIPES[n].__doc__ or "").strip().splitlines() or [""])[0] for n in RECIPES}
        if args.json:
            print(json.dumps([{"name": n, "doc": docs[n]} for n in sorted(docs)], indent=2))
            return 0
        width = max(len(n) for n in RECIPES)
        for name in sorted(RECIPES):
            print(f"{name:<{width}}  {docs[name]}")
        return 0

    usage = args.config_parser.format_usage().removeprefix("usage: ").strip()
    # the same class as the command's parser: its errors reach the cli (text or JSON)
    rest = type(args.config_parser)(prog=args.config_parser.prog, usage=usage, add_help=False)
    _add_show_options(rest)
    rest.add_argument("-h", "--help", action="store_true")
    rest.add_argument("overrides", nargs="*")
    tail = rest.parse_intermixed_args(args.overrides)
    if tail.help:
        args.config_parser.print_help()
        return 0
    cfg = build_config(args.recipe, tail.yaml or args.yaml, tail.overrides)
    if tail.json or args.json:
        print(json.dumps(to_dict(cfg), indent=2))
    else:
        print(to_yaml(cfg), end="")
    return 0
