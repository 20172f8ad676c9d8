"""Run one fuzz target under atheris (libFuzzer): python run_target.py NAME [libFuzzer args].

Any exception that escapes the target is a finding (libFuzzer saves the input as
crash-*); so are a Violation of the file rules and a MemoryError from the per-input
memory cap (see guard.py). `-timeout` bounds each input's time.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import atheris  # noqa: E402


def _import_all(prefixes: tuple[str, ...]) -> None:
    """Only modules imported inside the instrumentation block report coverage, and the
    formats registry imports its modules lazily: import the target's modules now.
    Instrumenting costs seconds per package, so each target names only its own."""
    for name in prefixes:
        try:
            mod = importlib.import_module(name)
        except Exception:  # a part still being built: its target is skipped anyway
            continue
        for info in pkgutil.walk_packages(getattr(mod, "__path__", []), name + "."):
            if info.name.endswith("__main__"):
                continue  # importing it would run the CLI
            try:
                importlib.import_module(info.name)
            except Exception:
                pass


from tests.fuzz.targets import TARGETS  # noqa: E402

TARGET = TARGETS[sys.argv.pop(1)]
with atheris.instrument_imports(include=list(TARGET.covers)):
    _import_all(TARGET.covers)


def main() -> None:
    atheris.Setup(sys.argv, TARGET.run)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
