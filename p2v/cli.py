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
from typing import Any

from p2v import __version__, commands


class CLIError(Exception):
    """A bad invocation found after parsing (exit status 1, one line)."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or, with `command`, one in which only that
    subcommand's arguments are declared (the others cost ~15 ms of every start)."""
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
    only = _OneCommand(sub, command) if command else None
    for name in _command_modules():
        importlib.import_module(f"{commands.__name__}.{name}").register(only or sub)
    if only is not None and not only.found:
        return build_parser()  # not a command: the full parser names the real ones
    return parser


def _command_modules() -> list[str]:
    """The modules of p2v/commands (pkgutil.iter_modules would load `inspect`: ~7 ms)."""
    names = {
        entry.name.removesuffix(".py")
        for path in commands.__path__
        for entry in os.scandir(path)
        if entry.name.endswith(".py") and not entry.name.startswith("_")
    }
    return sorted(names)


class _OneCommand:
    """Stands for argparse's subparsers action while the commands register: the named
    command gets its real parser, every other one a stand-in that ignores what is
    declared on it."""

    def __init__(self, sub: argparse._SubParsersAction, name: str) -> None:
        self._sub = sub
        self._name = name
        self.found = False

    def add_parser(self, name: str, **kwargs: Any) -> object:
        if name != self._name:
            return _Ignored()
        self.found = True
        return self._sub.add_parser(name, **kwargs)


class _Ignored:
    """A parser, group or action whose every method does nothing and returns itself."""

    def __getattr__(self, attr: str) -> object:
        return self._ignore

    def _ignore(self, *args: object, **kwargs: object) -> _Ignored:
        return self


def main(argv: list[str] | None = None) -> int:
    return dispatch(parse(sys.argv[1:] if argv is None else argv))


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line's arguments; building the parser imports the command's modules."""
    # global options take no value: the first other word is the command
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
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
    """The console script: main(), with the collector paused while it starts, then an
    exit that skips the interpreter's teardown (freeing every module and object: ~16 ms
    of each `p2v` run, a tenth of a small conversion) once nothing is left to it: the
    atexit handlers (weakref finalizers, log handlers) run first, and a thread still
    running means the ordinary exit, which waits."""
    import atexit
    import gc
    import threading

    # Parsing imports the command modules and what they use (numpy, formats): ~20,000
    # objects the collector tracks, all living as long as the process. Collecting would
    # only walk them again and again (~5 ms of every start); it resumes for the command,
    # with them frozen out of its sight.
    gc.disable()
    args = parse(sys.argv[1:])
    gc.freeze()
    gc.enable()
    code = dispatch(args)
    if threading.active_count() > 1:
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 141  # stdout closed under us: as a broken pipe
    os._exit(code)


def describe(exc: BaseException) -> str:
    """One line for the user: the message, and the cause when it adds something."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    text = str(exc) or type(exc).__name__
    if not isinstance(exc, (ValueError, CLIError)) and type(exc).__module__ == "builtins":
        text = f"{type(exc).__name__}: {text}"  # an unexpected failure: name its kind
    return " ".join(text.split())
