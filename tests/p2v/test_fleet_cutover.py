"""Cut-over steps as tasks with their own state: final sync, source shutdown over SSH,
guest conversion, define-and-start on a libvirt URI (libvirt's test:///default driver);
a failed step stops that server only and says why in one line."""

from __future__ import annotations

import os

from tests.external import need_tool
from tests.p2v import test_fleet as rig
from tests.p2v.test_fleet import assert_same, output_of, p2v, sources, status_json, write_plan

redis_server = rig.redis_server
workers = rig.workers


def test_cutover_steps_run_in_order_and_a_failed_one_stops_its_server_only(
    sshd, workers, redis_server, tmp_path
):
    need_tool("qemu-img", "virsh")
    disks = sources(tmp_path, 2)
    marker = tmp_path / "shutdown-ran"
    common = {"target": "kvm", "libvirt_uri": "test:///default"}
    servers = [
        {
            "name": "web",
            "disks": [disks[0]],
            # the test's "server" is this machine: the shutdown leaves a mark instead
            "shutdown_command": f"touch {marker}",
            "cutover": ["start", "shutdown", "sync"],  # run in their fixed order
            **common,
        },
        # a blank disk: no guest OS to convert, so the conversion fails (or, in a p2v
        # without drivers.guest, says it is unavailable): never a silent success
        {"name": "db", "disks": [disks[1]], "cutover": ["convert", "start"], **common},
    ]
    plan = write_plan(tmp_path, sshd, [servers])
    # a conversion boots libguestfs's appliance (minutes on a loaded machine under TCG):
    # no second delivery while it runs, and a generous bound for the whole run
    workers.start(1, visibility=1800)
    res = p2v("run", plan, "--broker", redis_server.url, timeout=1800)
    assert res.returncode == 1, res.stdout + res.stderr
    by_name = {s["name"]: s for s in status_json(plan, redis_server.url)["servers"]}

    web = by_name["web"]
    assert web["state"] == "done", web
    assert list(web["steps"]) == ["clone", "sync", "shutdown", "start"]
    assert set(web["steps"].values()) == {"done"}
    assert os.path.exists(marker)
    assert_same(disks[0], output_of(tmp_path, "web", disks[0]))

    db = by_name["db"]
    assert db["state"] == "failed"
    assert db["steps"] == {"clone": "done", "convert": "failed", "start": "pending"}
    assert db["step"] == "convert" and db["error"] and "\n" not in db["error"]
    assert "Traceback" not in res.stdout + res.stderr
