"""The ``kvpress`` command line: ``kvpress demo``, ``kvpress eval``, ``kvpress perplexity``, ...

Each subpackage that offers a command exposes ``add_subcommand(subparsers)``; the parser sets
``func`` on its namespace, called with the parsed arguments. Errors are handled here, once, for every command:
an exception out of ``func`` prints one line, ``kvpress <command>: error: <message>``, on stderr and exits with
status 2; ``--debug`` (anywhere on the line) or ``KVPRESS_DEBUG=1`` re-raises it with its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Modules that register sub-commands; a module missing its optional dependencies is skipped with a note.
_COMMAND_MODULES = (
    "kvpress.demo", "kvpress.eval.cli", "kvpress.eval.perplexity_cli", "kvpress.scorer.cli", "kvpress.sweep.cli",
    "kvpress.duo.cli", "kvpress.cache_cli",
)


DEBUG_ENV = "KVPRESS_DEBUG"
# Errors that a user's input causes: printed as one line. Anything else is a bug: one line too, marked as such.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, LookupError, OSError, ImportError)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors are one line too (every sub-command's parser is of this class:
    ``add_subparsers`` builds them with the class of their parent)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvpress", description="KV-cache compression for HF transformers",
                                     epilog=f"Errors print one line (exit status 2); --debug (anywhere on the line) or "
                                            f"{DEBUG_ENV}=1 shows the traceback.")
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
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


def debug_requested(argv: list[str] | None = None) -> bool:
    """``--debug`` on the command line (before or after the command) or ``KVPRESS_DEBUG`` set to a true value."""
    flag = "--debug" in (sys.argv[1:] if argv is None else argv)
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def error_line(command: str | None, err: BaseException | str) -> str:
    """The one line every command prints for a failure: ``kvpress <command>: error: <message>``."""
    prefix = f"kvpress {command}" if command else "kvpress"
    if isinstance(err, str):
        return f"{prefix}: error: {err}"
    message = str(err) or type(err).__name__
    if isinstance(err, KeyError) and err.args:
        message = str(err.args[0])  # KeyError's str() adds quotes
    if not isinstance(err, USER_ERRORS):
        message = f"{type(err).__name__}: {message} (unexpected; rerun with --debug for the traceback)"
    return f"{prefix}: error: {' '.join(message.split())}"


def fail(command: str | None, err: BaseException | str) -> int:
    """Print :func:`error_line` to stderr and return the exit status 2."""
    print(error_line(command, err), file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run one command; every error becomes one line on stderr and exit status 2 (``--debug``: the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    parser = build_parser()
    args = parser.parse_args([a for a in argv if a != "--debug"])  # argparse errors exit 2 with a usage line
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"kvpress {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place that turns errors into a line (see the docstring)
        if debug:
            raise
        return fail(args.command, err)


if __name__ == "__main__":
    sys.exit(main())
