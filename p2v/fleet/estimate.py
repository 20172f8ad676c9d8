"""`p2v run PLAN --estimate`: a plan's waves' durations on paper, and where the bottleneck
sits (a model, not a measurement; docs/fleet.md shows a 500-server run of it).

Each server copies its used bytes at the least of its source link and its cap. A worker
runs `slots` servers at once and its NIC carries at most `worker_nic`; the shared output
takes at most `storage` writes. When a limit binds, the flows through it are slowed in
proportion (a fluid model: TCP's sharing is about that on average). The simulation steps
from one server's end to the next, so its cost is the number of servers, whatever the
bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SOURCE, WORKER_NIC, STORAGE, NONE = "source links", "worker NICs", "storage writes", "none"


@dataclass
class Load:
    name: str
    used_bytes: int
    link: float  # bytes/s the source's link gives
    cap: float | None = None  # the plan's max_bandwidth for it


@dataclass
class Capacity:
    workers: int
    slots: int = 2  # servers a worker runs at once (its --concurrency)
    worker_nic: float = 1.25e9  # bytes/s: 10 GbE
    storage: float = 4e9  # bytes/s the output location writes, all workers together


@dataclass
class WaveEstimate:
    index: int
    name: str
    servers: int
    bytes: int
    seconds: float
    #: seconds during which each limit bound the copy (the bottleneck's moves)
    bound_by: dict[str, float] = field(default_factory=dict)


@dataclass
class Estimate:
    workers: int
    waves: list[WaveEstimate]

    @property
    def seconds(self) -> float:
        return sum(w.seconds for w in self.waves)


def _rates(active: list[tuple[Load, int, float]], cap: Capacity) -> tuple[list[float], str]:
    """Each active copy's rate, and the limit that binds most."""
    rates = [min(load.link, load.cap or load.link) for load, _, _ in active]
    binding = SOURCE if active else NONE
    for w in range(cap.workers):
        idx = [i for i, (_, worker, _) in enumerate(active) if worker == w]
        total = sum(rates[i] for i in idx)
        if total > cap.worker_nic:
            for i in idx:
                rates[i] *= cap.worker_nic / total
            binding = WORKER_NIC
    total = sum(rates)
    if total > cap.storage:
        rates = [r * cap.storage / total for r in rates]
        binding = STORAGE
    return rates, binding


def estimate_wave(loads: list[Load], cap: Capacity) -> tuple[float, dict[str, float]]:
    """Seconds to copy `loads` on `cap.workers` workers, and seconds per binding limit."""
    queue = sorted(loads, key=lambda load: -load.used_bytes)  # largest first, as a planner would
    free = [cap.slots] * cap.workers
    active: list[tuple[Load, int, float]] = []  # (load, worker, bytes left)
    now = 0.0
    bound: dict[str, float] = {}
    while queue or active:
        while queue and max(free) > 0:
            w = free.index(max(free))  # the least busy worker takes the next server
            free[w] -= 1
            load = queue.pop(0)
            active.append((load, w, float(load.used_bytes)))
        rates, binding = _rates(active, cap)
        step = min(left / r for (_, _, left), r in zip(active, rates))
        now += step
        bound[binding] = bound.get(binding, 0.0) + step
        still = []
        for (load, w, left), r in zip(active, rates):
            left -= r * step
            if left <= 1e-6 * max(load.used_bytes, 1):
                free[w] += 1
            else:
                still.append((load, w, left))
        active = still
    return now, bound


def estimate_plan(waves: list[tuple[str, list[Load]]], cap: Capacity) -> Estimate:
    out = []
    for i, (name, loads) in enumerate(waves):
        seconds, bound = estimate_wave(loads, cap)
        out.append(
            WaveEstimate(i, name, len(loads), sum(x.used_bytes for x in loads), seconds, bound)
        )
    return Estimate(workers=cap.workers, waves=out)


def _inventory_bytes(job: Any) -> int:
    """A quick inventory: the bytes of the disks the server's clone would copy (their
    sizes: what --skip-unused leaves out is not known until the copy plans)."""
    from p2v import protocol
    from p2v.remote import start_agent
    from p2v.ssh import connect

    session = connect(job.connect)
    try:
        conn = start_agent(session, python=job.clone.python)
        try:
            inv = conn.call(protocol.OP_INVENTORY)
        finally:
            conn.close()
    finally:
        session.close()
    wanted = job.clone.disks
    disks = [
        d
        for d in inv.get("disks") or []
        if (d.get("path") in wanted if wanted else not d.get("removable"))
    ]
    return sum(int(d.get("size") or 0) for d in disks)


def estimate_run(plan: Any, cap: Capacity, *, default_link: float) -> Estimate:
    """`p2v run PLAN --estimate`: the plan's waves on `cap`, each server's bytes from its
    `used_bytes` or, when absent, a quick inventory over SSH."""
    waves = []
    for wave in plan.waves:
        loads = [
            Load(
                name=job.name,
                used_bytes=job.used_bytes if job.used_bytes is not None else _inventory_bytes(job),
                link=job.link or default_link,
                cap=job.clone.max_bandwidth,
            )
            for job in wave.servers
        ]
        waves.append((wave.name, loads))
    return estimate_plan(waves, cap)
