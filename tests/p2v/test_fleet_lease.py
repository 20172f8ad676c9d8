"""The output lease against a real redis-server: one winner in a forced race, a stalled
holder that loses its lease stops writing, and a plan's clone delivered to two workers at
once is written by one of them."""

from __future__ import annotations

import threading
import time

import pytest

from p2v.fleet.lease import Lease, LeaseLost, foreign_writes, history
from tests.external import need_tool
from tests.p2v import test_fleet as rig
from tests.p2v.test_fleet import (
    DEADLINE,
    assert_same,
    output_of,
    plan_pid,
    server_record,
    sources,
    wait_for,
    write_plan,
)

# the fleet rig's fixtures, shared with this module
redis_server = rig.redis_server
workers = rig.workers


def test_forced_race_has_exactly_one_winner(redis_server):
    contenders = 16
    barrier = threading.Barrier(contenders)
    won: list[Lease] = []

    def contend(i: int) -> None:
        lease = Lease(redis_server.client(), "p2v:lease:race", ttl=30, owner=f"c{i}")
        barrier.wait()
        if lease.acquire():
            won.append(lease)

    for _ in range(5):  # five rounds, each a fresh key
        redis_server.client().delete("p2v:lease:race", "p2v:lease:race:log")
        won.clear()
        threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1
        # the winner's renewal thread stops here, not when the test's Redis is gone
        won[0].release()


def test_stalled_holder_loses_the_lease_and_stops_writing(redis_server):
    r = redis_server.client()
    stalled = Lease(r, "p2v:lease:out", ttl=1.0, owner="stalled")
    assert stalled.acquire()
    stalled.check()  # a write while it holds the lease
    stalled._stop.set()  # its renewals stop, as in a process frozen by SIGSTOP
    stalled._thread.join()
    successor = Lease(r, "p2v:lease:out", ttl=30, owner="successor")
    wait_for(successor.acquire, "the stalled lease to lapse", timeout=30)
    successor.check()
    # the stalled holder wakes up: its next renewal fails, and it writes no more
    assert stalled.renew() is False
    with pytest.raises(LeaseLost):
        stalled.check()
    assert stalled.holder() == "successor"
    assert foreign_writes(r, "p2v:lease:out") == []
    successor.release()
    events = [(e["owner"], e["event"]) for e in history(r, "p2v:lease:out")]
    assert events == [
        ("stalled", "acquire"),
        ("stalled", "write"),
        ("successor", "acquire"),
        ("successor", "write"),
        ("successor", "release"),
    ]


def test_the_checker_sees_a_second_writer(redis_server):
    """foreign_writes can fail: a write logged by a holder after another's grant."""
    r = redis_server.client()
    a = Lease(r, "p2v:lease:x", ttl=30, owner="a")
    assert a.acquire()
    r.delete("p2v:lease:x")  # the lease vanishes under a (as if it had lapsed)
    b = Lease(r, "p2v:lease:x", ttl=30, owner="b")
    assert b.acquire()
    a._log("write")  # a writes without checking
    assert [w["owner"] for w in foreign_writes(r, "p2v:lease:x")] == ["a"]
    a.release()
    b.release()


def test_a_clone_delivered_to_two_workers_at_once_has_one_writer(
    sshd, workers, redis_server, tmp_path
):
    need_tool("qemu-img")
    from p2v.fleet.app import configure, redis_client
    from p2v.fleet.controller import submit_wave
    from p2v.fleet.status import Store
    from p2v.job import load_plan

    (disk,) = sources(tmp_path, 1, size_mib=36)
    plan_path = write_plan(
        tmp_path, sshd, [[{"name": "twice", "disks": [disk], "max_bandwidth": "4M"}]]
    )
    plan = load_plan(plan_path)
    pid = plan_pid(plan_path)
    workers.start(2, concurrency=1)
    configure(redis_server.url)
    store = Store(redis_client(redis_server.url))
    store.register(pid, plan.name, plan.path, [{"name": "w", "servers": ["twice"]}])
    # the same server's chain sent twice, both picked up at once by the two idle workers
    assert submit_wave(plan, pid, 0, store) == 1
    assert submit_wave(plan, pid, 0, store) == 1
    wait_for(
        lambda: store.step_state(pid, "twice", "clone") == "done",
        "the clone",
        logs=workers.logs,
        timeout=DEADLINE,
    )
    time.sleep(3)  # the second delivery's retry finds the step done
    assert_same(disk, output_of(tmp_path, "twice", disk))
    key = f"p2v:lease:{pid}:twice"
    r = redis_server.client()
    assert foreign_writes(r, key) == []
    writers = {e["owner"] for e in history(r, key) if e["event"] == "write"}
    assert len(writers) == 1
    # the race happened: the second delivery met the first's lease
    assert "output leased by" in workers.logs()
    assert server_record(r, pid, "twice")["resumed_from"] == "0"


def test_a_lapsed_lease_nobody_took_is_taken_back(redis_server):
    """Redis restarted (or away longer than the ttl) and nobody else took the lease: the
    holder's next renewal takes it back and the copy goes on."""
    r = redis_server.client()
    lease = Lease(r, "p2v:lease:back", ttl=30, owner="holder")
    assert lease.acquire()
    r.delete("p2v:lease:back")
    assert lease.renew() is True
    lease.check()
    assert lease.holder() == "holder"
    assert [e["event"] for e in history(r, "p2v:lease:back")][:3] == [
        "acquire",
        "reacquire",
        "write",
    ]
    lease.release()
