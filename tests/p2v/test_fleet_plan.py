"""Fleet plans (p2v/job.py): waves, output, caps, window, cut-over steps; errors that name
the file, the line and the key; today's job files unchanged."""

from __future__ import annotations

import os

import pytest

from p2v import job

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "samples", "job.yaml")

PLAN = """\
name: evacuation
output: clones
window: {not_before: 2026-12-08T22:00:00Z, not_after: "2026-12-09T06:00:00+01:00"}
defaults: {user: root, max_bandwidth: 40M, cutover: [sync, convert], target: kvm}
waves:
  - name: web
    max_bandwidth: 60M
    servers:
      - {host: web1}
      - {host: web2, max_bandwidth: 10M}
      - {host: web3, cutover: [start, sync], libvirt_uri: "qemu:///system"}
  - servers:
      - {host: db1, cutover: []}
"""


def write(tmp_path, text: str) -> str:
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    return str(path)


def test_plan_with_waves_caps_window_and_cutover(tmp_path):
    plan = job.load_plan(write(tmp_path, PLAN))
    assert plan.name == "evacuation"
    assert [w.name for w in plan.waves] == ["web", "wave 2"]
    assert [s.name for s in plan.servers] == ["web1", "web2", "web3", "db1"]
    assert [s.wave for s in plan.servers] == [0, 0, 0, 1]
    assert plan.output == str(tmp_path / "clones")
    assert plan.servers[0].outdir == str(tmp_path / "clones" / "web1")
    # the wave's 60 MB/s is shared by its three servers; a smaller own cap wins
    caps = [s.clone.max_bandwidth for s in plan.servers]
    assert caps == [20e6, 10e6, 20e6, 40e6]
    assert plan.not_before.isoformat() == "2026-12-08T22:00:00+00:00"
    assert plan.not_after.isoformat() == "2026-12-09T06:00:00+01:00"
    assert plan.servers[0].cutover == ["sync", "convert"]
    assert plan.servers[2].cutover == ["sync", "start"]  # the fixed order
    assert plan.servers[3].cutover == []


def test_todays_job_files_load_as_one_wave():
    plan = job.load_plan(SAMPLE)
    assert len(plan.waves) == 1 and plan.shared
    servers, concurrency = job.load_job(SAMPLE)
    assert [s.name for s in servers] == [s.name for s in plan.servers]
    assert concurrency == plan.concurrency


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("waves:\n  - servers:\n      - host: a\n        colour: red\n", "line 4 (key colour)"),
        ("waves:\n  - servers: [{host: a}]\n    speed: 3\n", "line 3 (key speed)"),
        (
            "waves:\n  - name: x\n    max_bandwidth: fast\n    servers: [{host: a}]\n",
            "line 3 (key max_bandwidth)",
        ),
        ("servers:\n  - host: a\n    cutover: [reboot]\n", "line 3 (key cutover)"),
        ("servers:\n  - host: a\n    cutover: [start]\n    target: kvm\n", "needs libvirt_uri"),
        ("servers:\n  - host: a\n    cutover: [convert]\n", "need a target"),
        ("window: {not_before: soon}\nservers: [{host: a}]\n", "line 1 (key not_before)"),
        (
            "window: {not_before: 2026-01-02, not_after: 2026-01-01}\nservers: [{host: a}]\n",
            "not_after comes before",
        ),
        ("broker: amqp://x\nservers: [{host: a}]\n", "line 1 (key broker)"),
        ("servers: [{host: a}]\nwaves: [{servers: [{host: b}]}]\n", "not both"),
        ("waves: []\n", "non-empty"),
        ("servers: [{host: a}]\noutput: 3\n", "line 2 (key output)"),
        ("defaults:\n  port: 0\nservers: [{host: a}]\n", "line 2 (key port)"),
        ("name: ../x\nservers: [{host: a}]\n", "line 1 (key name)"),
    ],
)
def test_bad_plans_name_the_line_and_key(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(job.JobError) as err:
        job.load_plan(path)
    message = str(err.value)
    assert words in message
    assert "\n" not in message


def test_run_wave_out_of_range_is_refused(tmp_path):
    from p2v.fleet.controller import PlanError, run_plan

    plan = job.load_plan(write(tmp_path, "servers: [{host: a}]\n"))
    with pytest.raises(PlanError, match="the plan has 1 waves"):
        run_plan(plan, "redis://127.0.0.1:1/0", first_wave=3)


def test_in_process_run_refuses_cutover_steps_and_a_closed_window(tmp_path):
    staged = write(tmp_path, "servers: [{host: a, cutover: [sync]}]\n")
    with pytest.raises(job.JobError, match="run on workers: p2v run PLAN --broker"):
        job.run_job(staged)
    closed = tmp_path / "closed.yaml"
    closed.write_text("window: {not_after: 2001-01-01T00:00:00Z}\nservers: [{host: a}]\n")
    with pytest.raises(job.JobError, match="window closed"):
        job.run_job(str(closed))


def test_estimate_model_moves_its_bottleneck():
    """The model: 4 servers of 100 GB behind 1 GB/s links; what binds depends on the
    workers' NICs and the storage."""
    from p2v.fleet.estimate import STORAGE, WORKER_NIC, Capacity, Load, estimate_wave

    loads = [Load(f"s{i}", 100 * 10**9, link=1e9) for i in range(4)]
    # ample NICs and storage: the source links bind; two slots per worker, 2 workers
    seconds, bound = estimate_wave(loads, Capacity(workers=2, worker_nic=10e9, storage=10e9))
    assert seconds == pytest.approx(100) and set(bound) == {"source links"}
    # one 1 GB/s NIC per worker: two copies share it
    seconds, bound = estimate_wave(loads, Capacity(workers=2, worker_nic=1e9, storage=10e9))
    assert seconds == pytest.approx(200) and set(bound) == {WORKER_NIC}
    # storage at 1 GB/s for everyone
    seconds, bound = estimate_wave(loads, Capacity(workers=2, worker_nic=10e9, storage=1e9))
    assert seconds == pytest.approx(400) and set(bound) == {STORAGE}
    # caps: 4 servers capped at 0.5 GB/s run on 1 worker with 2 slots: two rounds of 200 s
    capped = [Load(x.name, x.used_bytes, x.link, cap=0.5e9) for x in loads]
    seconds, _ = estimate_wave(capped, Capacity(workers=1, worker_nic=10e9, storage=10e9))
    assert seconds == pytest.approx(400)


def test_estimate_command_uses_used_bytes(tmp_path, capsys):
    from p2v.cli import main

    path = write(
        tmp_path,
        "waves:\n"
        "  - servers: [{host: a, used_bytes: 250G}, {host: b, used_bytes: 250G}]\n"
        "  - servers: [{host: c, used_bytes: 1T, link: 1G}]\n",
    )
    assert main(["run", path, "--estimate", "--workers", "2", "--link", "125M"]) == 0
    out = capsys.readouterr().out
    # wave 1: 250 GB at 125 MB/s, both at once: 2000 s; wave 2: 1 TB at 1 GB/s: 1000 s
    assert "wave 1: 2 servers" in out and "33 min" in out
    assert "wave 2: 1 servers" in out and "17 min" in out
