"""The harness's rules that exceptions alone cannot show: files a parser touches, and how
much memory one input may take.

`confined(read=..., write=...)` installs (once per process) an audit hook on the events
CPython raises for opening, creating, renaming and removing files. While a confinement
is active, opening a file outside the `read` directories (other than Python's own
modules, which lazy imports open), writing anywhere outside the `write` directories, or
opening any of the `sentinels` (backing files seeded inputs name) is a `Violation`. The
hook raises it (a BaseException, so a parser's `except Exception` cannot swallow it: the
open never happens) and records it, so the target can re-raise after the parser returns
even if something caught it.

`memory_cap(nbytes)` bounds the address space the process may add while one input runs
(RLIMIT_AS above the current size): a hostile header that makes a parser allocate past
the cap raises MemoryError, which the target reports as a finding.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
#: events whose path arguments are all changed on disk
_CHANGE_EVENTS = {
    "os.remove": 1,
    "os.rename": 2,
    "os.mkdir": 1,
    "os.rmdir": 1,
    "os.symlink": 2,
    "os.link": 2,
    "os.truncate": 1,
    "os.chmod": 1,
    "os.chown": 1,
    "os.utime": 1,
    "shutil.rmtree": 1,
    "shutil.move": 2,
    "shutil.copyfile": 2,
    "os.mkfifo": 1,
    "os.mknod": 1,
}
#: where Python's own code lives: lazy imports open these, and so may zoneinfo or locale
_RUNTIME_DIRS = tuple(
    os.path.realpath(p)
    for p in {
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        "/usr/lib",
        "/usr/share",
    }
)


class Violation(BaseException):
    """A parser touched a file the harness forbids (not an Exception: never swallowed)."""


@dataclass
class Rules:
    read: tuple[str, ...]
    write: tuple[str, ...]
    sentinels: frozenset[str] = frozenset()
    found: list[str] = field(default_factory=list)


_active: Rules | None = None
_installed = False
_lock = threading.Lock()


def _inside(path: str, dirs: tuple[str, ...]) -> bool:
    return any(path == d or path.startswith(d.rstrip(os.sep) + os.sep) for d in dirs)


def _real(path: object) -> str | None:
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, str):
        return None  # a file descriptor: opened earlier, under the rules then
    return os.path.realpath(path)


def _is_write(mode: object, flags: object) -> bool:
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)


def _refuse(rules: Rules, message: str) -> None:
    rules.found.append(message)
    raise Violation(message)


def _hook(event: str, args: tuple) -> None:
    rules = _active
    if rules is None:
        return
    if event == "open":
        path = _real(args[0])
        if path is None:
            return
        mode = args[1] if len(args) > 1 else None
        flags = args[2] if len(args) > 2 else 0
        if path in rules.sentinels:
            _refuse(rules, f"opened {path}, a backing file the caller did not allow")
        if _is_write(mode, flags):
            if not _inside(path, rules.write):
                _refuse(rules, f"opened {path} for writing, outside {', '.join(rules.write)}")
        elif not _inside(path, rules.read + rules.write) and not _inside(path, _RUNTIME_DIRS):
            _refuse(rules, f"opened {path}, outside the input's directory")
        return
    count = _CHANGE_EVENTS.get(event)
    if count is None:
        return
    for arg in args[:count]:
        path = _real(arg)
        if path is not None and not _inside(path, rules.write):
            _refuse(rules, f"{event} on {path}, outside {', '.join(rules.write) or 'nothing'}")


def _install() -> None:
    global _installed
    with _lock:
        if not _installed:
            sys.addaudithook(_hook)
            _installed = True


@contextlib.contextmanager
def confined(
    *, read: tuple[str, ...] = (), write: tuple[str, ...] = (), sentinels: tuple[str, ...] = ()
) -> Iterator[Rules]:
    """Apply the file rules to everything the process does inside the block; re-raise
    the first violation at the end even when the code under test caught it."""
    global _active
    _install()
    rules = Rules(
        read=tuple(os.path.realpath(d) for d in read),
        write=tuple(os.path.realpath(d) for d in write),
        sentinels=frozenset(os.path.realpath(s) for s in sentinels),
    )
    _active = rules
    try:
        yield rules
    finally:
        _active = None
    if rules.found:
        raise Violation(rules.found[0])


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def memory_cap(nbytes: int) -> Iterator[None]:
    """Let the process grow by at most `nbytes` of address space inside the block."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_address_space() + nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
