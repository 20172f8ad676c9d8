"""Job files: parsing with clear refusals, and a real run of two servers at once."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from p2v import job
from tests.external import p2v, qemu_img

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "samples", "job.yaml")


def test_sample_job_parses():
    servers, concurrency = job.load_job(SAMPLE)
    assert concurrency == 2
    web, db = servers
    assert (web.connect.user, web.connect.host, web.clone.disks) == (
        "root",
        "web1.example.com",
        ["/dev/sda"],
    )
    assert (db.connect.user, db.connect.sudo, db.connect.password_env) == (
        "admin",
        True,
        "P2V_DB1_PASSWORD",
    )
    assert db.clone.snapshot and db.clone.skip_unused and db.clone.out_format == "qcow2"
    assert os.path.isabs(db.outdir) and db.outdir.endswith("clones/db1")


@pytest.mark.parametrize(
    "text, words",
    [
        ("servers: []", "non-empty"),
        ("servers: [{host: a, pasword: x}]", "unknown keys pasword"),
        ("servers: [{host: a, password: x}]", "no password in a job file"),
        ("defaults: {password: x}\nservers: [{host: a}]", "no password"),
        ("concurrency: 0\nservers: [{host: a}]", "concurrency"),
        ("servers: [{name: a}]", "host is required"),
        ("servers: [{host: a, compress: lz4}]", "compress"),
        ("servers: [{host: a}, {host: a}]", "repeat"),
        ("servers: [{host: a, skip_unused: 'yes'}]", "true or false"),
        ("servers: [{host: a, port: 99999}]", "port"),
        ("servers: {", "not valid YAML"),
    ],
)
def test_bad_job_files_are_refused(tmp_path, text, words):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(job.JobError, match=words):
        job.load_job(str(path))


def test_run_clones_two_servers_concurrently(sshd, server_disk, tmp_path):
    disk, _ = server_disk
    second = str(tmp_path / "sdb.raw")
    shutil.copyfile(disk, second)
    path = tmp_path / "job.yaml"
    path.write_text(
        f"""
concurrency: 2
defaults:
  port: {sshd.port}
  identity: {sshd.user_key}
  known_hosts: {sshd.known_hosts}
  format: raw
servers:
  - {{name: one, host: root@127.0.0.1, disks: [{disk}], outdir: out/one, skip_unused: true}}
  - {{name: two, host: root@127.0.0.1, disks: [{second}], outdir: out/two}}
  - {{name: bad, host: root@127.0.0.1, disks: [/nonexistent], outdir: out/bad}}
"""
    )
    res = p2v("run", str(path), "--output", "json")
    assert res.returncode == 1, res.stderr  # one server failed; the others finished

    report = json.loads(res.stdout)
    outcome = {s["name"]: s for s in report["servers"]}
    assert outcome["one"]["ok"] and outcome["two"]["ok"]
    assert not outcome["bad"]["ok"] and "/nonexistent" in outcome["bad"]["error"]
    for name, src in (("one", None), ("two", second)):
        image = tmp_path / "out" / name / os.path.basename(src or disk)
        assert image.exists()
        if src:
            assert qemu_img("compare", "-f", "raw", "-F", "raw", src, str(image)).returncode == 0
    res = p2v("run", str(path), "--sync", "-j", "1")
    assert "two: ok" in res.stdout and "bad: FAILED" in res.stdout
