"""The short fuzz run of `make test`: each parser gets a few seconds of coverage-guided
mutation of small valid inputs; only its own error tree may escape, no input may take
more than a few seconds, allocate past the cap, touch files outside its directory or open
a backing file. `make fuzz` runs the long version (P2V_FUZZ_SECONDS=600).

Every crash found and fixed leaves its input in regressions/TARGET/; those are replayed
here in-process, so a fix that regresses fails fast and without atheris."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.external import need_tool
from tests.fuzz.seeds import make_corpus
from tests.fuzz.targets import TARGETS

HERE = os.path.dirname(os.path.abspath(__file__))
REGRESSIONS = os.path.join(HERE, "regressions")
SECONDS = int(os.environ.get("P2V_FUZZ_SECONDS", "4"))
#: per input; the slowest legitimate input (a 34 MiB FAT32 seed mapped) takes well under 1 s
INPUT_TIMEOUT = int(os.environ.get("P2V_FUZZ_TIMEOUT", "5"))
#: kept for the small seeds (a few MiB); targets.py applies the per-input cap in-process
MALLOC_LIMIT_MB = 1024
#: where the long run leaves its corpora and findings (make fuzz), so a run can resume
KEEP = os.environ.get("P2V_FUZZ_KEEP")


def build_corpus(name: str, corpus: str) -> int:
    os.makedirs(corpus, exist_ok=True)
    for kind in TARGETS[name].seeds:
        make_corpus(kind, corpus)
    return len(os.listdir(corpus))


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_parser_survives_fuzzing(name, tmp_path):
    need_tool("qemu-img", "qemu-io")
    base = os.path.join(KEEP, name) if KEEP else str(tmp_path)
    corpus = os.path.join(base, "corpus")
    seeds = build_corpus(name, corpus)
    assert seeds, f"no seeds for {name}"
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "P2V_FUZZ_SCRATCH": str(tmp_path / "scratch")}
    res = subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "run_target.py"),
            name,
            corpus,
            f"-max_total_time={SECONDS}",
            f"-timeout={INPUT_TIMEOUT}",
            "-rss_limit_mb=2048",
            f"-malloc_limit_mb={MALLOC_LIMIT_MB}",
            f"-artifact_prefix={base}/",
            "-print_final_stats=1",
        ],
        capture_output=True,
        text=True,
        timeout=SECONDS + 180,
        env=env,
    )
    runs = re.search(r"Done (\d+) runs in (\d+) second", res.stderr)
    tail = "\n".join(res.stderr.splitlines()[-40:])
    assert res.returncode == 0, f"fuzzing {name} found a crash (input in {base}):\n{tail}"
    assert runs, tail
    with open(os.path.join(base, "stats"), "w") as f:
        f.write(f"{name} {runs.group(1)} {runs.group(2)} {seeds}\n")
    print(f"fuzz {name}: {runs.group(1)} inputs in {runs.group(2)} s from {seeds} seeds")


def _regressions() -> list[tuple[str, str]]:
    out = []
    if os.path.isdir(REGRESSIONS):
        for target in sorted(os.listdir(REGRESSIONS)):
            for f in sorted(os.listdir(os.path.join(REGRESSIONS, target))):
                out.append((target, f))
    return out


@pytest.mark.parametrize("target, case", _regressions())
def test_found_input_stays_fixed(target, case):
    """An input the fuzzer once broke a parser with: only its own errors now."""
    with open(os.path.join(REGRESSIONS, target, case), "rb") as f:
        data = f.read()
    TARGETS[target].run(data)


def test_harness_catches_a_backing_file_opened(tmp_path):
    """The file rules are live: opening a sentinel or writing outside is refused."""
    from tests.fuzz import guard, targets

    d = targets.scratch("img")
    sentinel = os.path.join(d, "backing.img")
    with pytest.raises(guard.Violation), targets.rules(b"", read=(d,)):
        try:
            open(sentinel, "rb").close()
        except Exception:
            pass  # a parser swallowing the refusal does not hide it
    with pytest.raises(guard.Violation), targets.rules(b"", read=(d,)):
        open(os.path.join(str(tmp_path), "escaped"), "wb").close()
    assert not os.path.exists(os.path.join(str(tmp_path), "escaped"))
    with pytest.raises(MemoryError), guard.memory_cap(64 << 20):
        bytearray(512 << 20)
    shutil.rmtree(targets._SCRATCH, ignore_errors=True)
