"""p2v: the application. The `p2v` command, SSH sessions, the imaging agent, clone/sync."""

import os

# numpy's OpenBLAS starts a spinning thread per core; p2v does no linear algebra, and
# those threads would take CPU from compression and I/O (seen in profiles of convert).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
