"""The ``kvpress`` command line: ``kvpress demo``, ``kvpress eval``, ``kvpress perplexity``, ...

Each subpackage that offers a command exposes ``add_subcommand(subparsers)``; the parser sets
``func`` on its namespace, called with the parsed arguments.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that register sub-commands; a module missing its optional dependencies is skipped with a note.
_COMMAND_MODULES = (
    "kvpress.demo", "kvpress.eval.cli", "kvpress.eval.perplexity_cli", "kvpress.scorer.cli", "kvpress.sweep.cli",
    "kvpress.duo.cli", "kvpress.cache_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpress", description="KV-cache compression for HF transformers")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("kvpress"):
                continue  # command not built yet in this checkout
            raise
        module.add_subcommand(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
