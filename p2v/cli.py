"""The `p2v` command: parse arguments, call one library function, print its result.

Subcommands live in `p2v/commands/`, one module per family, each with
`register(subparsers)`; they are discovered here so that adding one touches no other file.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from p2v import __version__, commands


class CLIError(Exception):
    """A bad invocation found after parsing (exit status 1, one line)."""


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="p2v",
        description=(
            "Convert physical servers and disk images into virtual machines, and "
            "live-migrate running guests. Image commands are spelled like qemu-img's."
        ),
    )
    parser.add_argument("--version", action="version", version=f"p2v {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks and debug logging"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _command_modules():
        importlib.import_module(f"{commands.__name__}.{name}").register(sub)
    return parser


def _command_modules() -> list[str]:
    """The modules of p2v/commands: each registers its family of subcommands."""
    names = {
        entry.name.removesuffix(".py")
        for path in commands.__path__
        for entry in os.scandir(path)
        if entry.name.endswith(".py") and not entry.name.startswith("_")
    }
    return sorted(names)


def main(argv: list[str] | None = None) -> int:
    return dispatch(parse(sys.argv[1:] if argv is None else argv))


def parse(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="p2v: %(message)s",
        stream=sys.stderr,
    )
    return args


def dispatch(args: argparse.Namespace) -> int:
    """Run the parsed command; its exit status."""
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("p2v: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
    except Exception as exc:
        if args.debug:
            raise
        print(f"p2v: error: {describe(exc)}", file=sys.stderr)
        return 1


def run() -> None:
    """The console script."""
    sys.exit(main())


def describe(exc: BaseException) -> str:
    """One line for the user: the message, and the cause when it adds something."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    text = str(exc) or type(exc).__name__
    if not isinstance(exc, (ValueError, CLIError)) and type(exc).__module__ == "builtins":
        text = f"{type(exc).__name__}: {text}"  # an unexpected failure: name its kind
    return " ".join(text.split())
