"""The model run docs/fleet.md shows: a 500-server, ~100 TB evacuation on 10 workers,
through p2v's estimate model (p2v/fleet/estimate.py). A model, not a measurement.

    .venv/bin/python samples/fleet_model.py
"""

from __future__ import annotations

import random

from p2v.fleet.estimate import Capacity, Load, estimate_plan

GbE, TEN_GbE = 125e6, 1.25e9


def fleet(seed: int = 20) -> list[tuple[str, list[Load]]]:
    """Five waves of 100 servers. Used bytes: mostly 50-250 GB, a tail of large database
    servers (0.75-1.75 TB), ~100 TB in all. Waves 1-3 sit on 1 GbE, waves 4-5 (the databases) on 10 GbE."""
    rng = random.Random(seed)
    waves = []
    for w in range(5):
        fast = w >= 3
        loads = []
        for i in range(100):
            big = fast and rng.random() < 0.12
            used = rng.uniform(0.75e12, 1.75e12) if big else rng.uniform(50e9, 250e9)
            loads.append(Load(f"w{w + 1}-{i:03d}", int(used), TEN_GbE if fast else GbE))
        waves.append((f"wave {w + 1} ({'10' if fast else '1'} GbE)", loads))
    return waves


def main() -> None:
    plan = fleet()
    total = sum(x.used_bytes for _, loads in plan for x in loads)
    print(f"{sum(len(loads) for _, loads in plan)} servers, {total / 1e12:.1f} TB used")
    for label, cap in [
        ("10 workers x 2 copies, 10 GbE NICs, storage 4 GB/s", Capacity(10, 2, TEN_GbE, 4e9)),
        ("10 workers x 8 copies, 10 GbE NICs, storage 4 GB/s", Capacity(10, 8, TEN_GbE, 4e9)),
        ("10 workers x 8 copies, 10 GbE NICs, storage 12 GB/s", Capacity(10, 8, TEN_GbE, 12e9)),
        ("10 workers x 8 copies, 25 GbE NICs, storage 12 GB/s", Capacity(10, 8, 3.125e9, 12e9)),
    ]:
        est = estimate_plan(plan, cap)
        print(f"\n{label}: {est.seconds / 3600:.1f} h")
        for w in est.waves:
            bound = ", ".join(f"{k} {v / w.seconds:.0%}" for k, v in sorted(w.bound_by.items()))
            print(f"  {w.name}: {w.bytes / 1e12:5.1f} TB {w.seconds / 3600:5.1f} h  ({bound})")


if __name__ == "__main__":
    main()
