"""`make bench`: run every benchmark script in this directory, one after the other."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    only = sys.argv[1:]
    failed = []
    for script in sorted(glob.glob(os.path.join(HERE, "bench_*.py"))):
        name = os.path.basename(script)[:-3]
        if only and name not in only:
            continue
        print(f"=== {name}", flush=True)
        if subprocess.run(
            [sys.executable, script], cwd=os.path.dirname(os.path.dirname(HERE))
        ).returncode:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
