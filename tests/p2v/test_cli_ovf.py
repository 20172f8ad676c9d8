"""`p2v ovf pack|unpack` and `p2v info` on appliances, as a user runs them."""

from __future__ import annotations

import io
import json
import os
import tarfile

from tests.external import need_tool, p2v, qemu_img, run

MiB = 1 << 20


def _disk(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(MiB)
        f.write(os.urandom(512 * 1024))
    return str(path)


def test_pack_info_unpack(tmp_path):
    need_tool("tar")
    d1, d2 = _disk(tmp_path / "a.raw", 16 * MiB), _disk(tmp_path / "b.raw", 8 * MiB)
    ova = tmp_path / "shop.ova"
    res = p2v("ovf", "pack", "--name", "shop", "--cpus", "2", "--memory", "3G", "--firmware", "efi",
              "--manifest", "sha1", "--ovf-version", "2", "-o", str(ova), d1, d2)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert run(["tar", "tf", str(ova)]).stdout.split() == [
        "shop.ovf", "shop.mf", "shop-disk1.vmdk", "shop-disk2.vmdk",
    ]  # fmt: skip
    with tarfile.open(ova) as tf:
        mf = tf.extractfile("shop.mf").read().decode()
        ovf_text = tf.extractfile("shop.ovf").read().decode()
    assert [line.split("(")[0] for line in mf.splitlines()] == ["SHA1"] * 3
    assert 'xmlns="http://schemas.dmtf.org/ovf/envelope/2"' in ovf_text
    info = json.loads(p2v("info", "--output", "json", str(ova), check=True).stdout)
    assert info["format"] == "ova" and info["manifest"] == "sha1"
    assert info["machine"]["memory"] == 3 << 30 and info["machine"]["firmware"] == "uefi"
    out = tmp_path / "out"
    res = p2v("ovf", "unpack", "-O", "raw", "--output", "json", str(ova), str(out))
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["machine"]["cpus"] == 2
    assert sorted(os.listdir(out)) == ["shop-disk1.img", "shop-disk2.img"]
    qemu_img("compare", "-f", "raw", "-F", "raw", d1, str(out / "shop-disk1.img"))
    qemu_img("compare", "-f", "raw", "-F", "raw", d2, str(out / "shop-disk2.img"))
    # the output exists now: refused without --force, the file untouched
    res = p2v("ovf", "pack", "-o", str(ova), d1)
    assert res.returncode == 1 and "exists" in res.stderr


def test_hostile_ova_via_the_command(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name in ("x.ovf", "../../escape.vmdk"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
    ova = tmp_path / "evil.ova"
    ova.write_bytes(buf.getvalue())
    res = p2v("ovf", "unpack", str(ova), str(tmp_path / "dir" / "out"))
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "'..'" in res.stderr
    assert sorted(os.listdir(tmp_path)) == ["evil.ova"]


def test_info_and_unpack_of_a_gzip_tar_ova(tmp_path):
    need_tool("tar", "gzip")
    disk = _disk(tmp_path / "a.raw", 8 * MiB)
    ova = tmp_path / "shop.ova"
    assert p2v("ovf", "pack", "--name", "shop", "-o", str(ova), disk).returncode == 0
    x = tmp_path / "x"
    x.mkdir()
    assert run(["tar", "xf", str(ova), "-C", str(x)]).returncode == 0
    tgz = tmp_path / "shop-tgz.ova"
    res = run(["tar", "czf", str(tgz), "shop.ovf", "shop.mf", "shop-disk1.vmdk"], cwd=x)
    assert res.returncode == 0, res.stderr
    info = json.loads(p2v("info", "--output", "json", str(tgz), check=True).stdout)
    assert info["format"] == "ova (gzip)" and info["manifest"] == "sha256"
    assert any("plain tar" in w for w in info["warnings"])
    out = tmp_path / "out"
    res = p2v("ovf", "unpack", "-O", "raw", str(tgz), str(out))
    assert res.returncode == 0, res.stderr
    qemu_img("compare", "-f", "raw", "-F", "raw", disk, str(out / "shop-disk1.img"))
