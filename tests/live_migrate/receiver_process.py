"""A receiver in its own process, as the destination of migration tests.

`start_receiver()` runs this module as a script: it imports only live_migrate (the
`p2v` command imports every subcommand, which costs a second per start), listens on a
free port, prints it, receives migrations one after the other (`--count`) and prints
each receiver's report as a line of JSON, refused connections included (serve's `once`:
the tests here look at those reports). The `p2v receive` command itself, which keeps
waiting after a refused connection, is tested in test_cli.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class ReceiverProcess:
    proc: subprocess.Popen
    address: tuple[str, int]
    stderr: list[str] = field(default_factory=list)

    def result(self, timeout: float = 60) -> dict:
        """The report of the next migration received, as a dict."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            self.kill()
            raise AssertionError(f"receiver printed no report: {line!r} {self.stderr}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        _, err = self.proc.communicate()
        self.stderr.append(err)


def start_receiver(*extra: str) -> ReceiverProcess:
    """Start a receiver on 127.0.0.1 (options: --max-memory BYTES, --keep, --prealloc,
    --no-hash, --tls-cert F --tls-key F [--tls-client-ca F]) and wait until it listens."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "tests.live_migrate.receiver_process", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("listening on "):
            host, _, port = line.split()[-1].rpartition(":")
            return ReceiverProcess(proc, (host, int(port)), lines)
    proc.kill()
    raise AssertionError(f"receiver did not start: {''.join(lines)}")


def main() -> None:
    from live_migrate.guests import target_factory
    from live_migrate.receiver import ReceiverOptions, serve
    from live_migrate.transport import Listener, tls_server_context

    p = argparse.ArgumentParser()
    p.add_argument("--max-memory", type=int)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-client-ca")
    p.add_argument("--count", type=int, default=1, help="migrations to receive")
    p.add_argument("--no-hash", action="store_true", help="skip the memory hash (benchmarks)")
    p.add_argument("--prealloc", action="store_true", help="touch all target memory at creation")
    args = p.parse_args()
    options = ReceiverOptions(hash_memory=not args.no_hash)
    if args.max_memory:
        options.max_memory = args.max_memory
    tls = None
    if args.tls_cert:
        tls = tls_server_context(args.tls_cert, args.tls_key, args.tls_client_ca)

    def listening(addr: tuple[str, int]) -> None:
        print(f"listening on {addr[0]}:{addr[1]}", file=sys.stderr, flush=True)

    listener = Listener(("127.0.0.1", 0), tls=tls)
    listening(listener.address)
    factory = target_factory("sim", keep=args.keep, prealloc=args.prealloc)
    for _ in range(args.count):
        report = serve(listener, factory, options, once=True)
        print(json.dumps(dataclasses.asdict(report)), flush=True)


if __name__ == "__main__":
    main()
