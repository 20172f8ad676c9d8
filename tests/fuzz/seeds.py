"""Seed corpora: small valid inputs made at test time (qemu-img, sgdisk, mkfs, and our
own builders for the protocols), never checked in.

`make_corpus(kind, directory)` writes the seeds of one kind; targets.py names the kinds
each target takes. A kind whose tool or module is missing yields no seeds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import zlib

SEEDS: dict[str, list[tuple[str, list[str]]]] = {
    # format: [(file name, qemu-img convert arguments after -O FMT)]
    "qcow2": [
        ("v3.qcow2", ["-o", "cluster_size=4k"]),
        ("v2.qcow2", ["-o", "compat=0.10,cluster_size=512"]),
        ("l2ext.qcow2", ["-o", "extended_l2=on,refcount_bits=1"]),
        ("zlib.qcow2", ["-c", "-o", "cluster_size=4k"]),
    ],
    "vmdk": [
        ("sparse.vmdk", []),
        ("stream.vmdk", ["-o", "subformat=streamOptimized"]),
    ],
    "vpc": [("dyn.vhd", []), ("fixed.vhd", ["-o", "subformat=fixed"])],
    "vhdx": [("dyn.vhdx", ["-o", "log_size=1M,block_size=1M"])],
    "vdi": [("dyn.vdi", [])],
    "vmdk-stream": [
        ("stream.vmdk", ["-o", "subformat=streamOptimized"]),
        ("stream-v1.vmdk", ["-o", "subformat=streamOptimized,hwversion=4"]),
    ],
}
SEED_FORMAT = {"vmdk-stream": "vmdk"}

SIZE = 2 << 20
QEMU_CREATE = ("qemu-img", "create", "-q", "-f")
QEMU_STREAM = ("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized")


def _source(path: str, size: int = SIZE) -> str:
    """A raw disk with a pattern, a run of text and holes: every kind of cluster."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(4096)
        f.write(bytes(range(256)) * 64)
        f.seek(size // 2)
        f.write(b"p2v-fuzz" * 1024)
    return path


def make_seeds(kind: str, directory: str) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    fmt = SEED_FORMAT.get(kind, kind)
    out = []
    for name, args in SEEDS[kind]:
        path = os.path.join(directory, name)
        raw = _source(path + ".src")
        res = subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", fmt, *args, raw, path],
            capture_output=True,
        )
        os.unlink(raw)
        if res.returncode == 0:
            out.append(path)
    return out


def _blank(path: str, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@contextlib.contextmanager
def _staging(directory: str):
    stage = tempfile.mkdtemp(prefix=".stage-", dir=os.path.dirname(os.path.abspath(directory)))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def make_backing_seeds(fmt: str, directory: str) -> list[str]:
    """Children naming a backing file (backing.img, backing.vmdk, ...) that the fuzzing
    directory holds as a sentinel: opened with allow_backing=False, none may be read."""
    os.makedirs(directory, exist_ok=True)
    out: list[str] = []
    with _staging(directory) as stage:
        made: list[str] = []
        if fmt == "qcow2":
            _blank(os.path.join(stage, "backing.img"), SIZE)
            for name, opts in (("child.qcow2", "cluster_size=4k"), ("child2.qcow2", "compat=0.10")):
                child = os.path.join(stage, name)
                res = subprocess.run(
                    [*QEMU_CREATE, "qcow2", "-o", opts, "-b", "backing.img", "-F", "raw", child],
                    cwd=stage,
                    capture_output=True,
                )
                if res.returncode == 0:
                    subprocess.run(
                        ["qemu-io", "-f", "qcow2", "-c", "write -P 7 64k 64k", child],
                        capture_output=True,
                    )
                    made.append(child)
        elif fmt == "vmdk":
            base = os.path.join(stage, "backing.vmdk")
            subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", base, "2M"], check=False)
            child = os.path.join(stage, "child.vmdk")
            res = subprocess.run(
                [*QEMU_CREATE, "vmdk", "-b", "backing.vmdk", "-F", "vmdk", child],
                cwd=stage,
                capture_output=True,
            )
            if res.returncode == 0:
                made.append(child)
        elif fmt in ("vpc", "vhdx"):
            made += _differencing(fmt, stage)
        for path in made:
            dst = os.path.join(directory, "backing-" + os.path.basename(path))
            shutil.move(path, dst)
            out.append(dst)
    return out


def _differencing(fmt: str, stage: str) -> list[str]:
    """qemu-img cannot write VHD or VHDX differencing disks: our own writer does."""
    import formats

    ext = {"vpc": "vhd", "vhdx": "vhdx"}[fmt]
    parent = os.path.join(stage, f"backing.{ext}")
    child = os.path.join(stage, f"child.{ext}")
    try:
        with formats.create(parent, fmt, SIZE) as img:
            img.write(0, b"parent" * 100)
        with formats.create(
            child, fmt, SIZE, backing_file=f"backing.{ext}", backing_fmt=fmt
        ) as img:
            img.write(65536, b"child" * 100)
    except (formats.FormatError, TypeError, NotImplementedError):
        return []
    return [child]


def make_vmdk_descriptor_seeds(directory: str) -> list[str]:
    """Descriptor files naming the extent files targets.py keeps beside the input
    (extent-flat.vmdk: 2048 sectors of data; extent-sparse.vmdk: a 1 MiB sparse extent),
    and one delta naming the sentinel parent."""
    os.makedirs(directory, exist_ok=True)
    head = '# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="{}"\n'
    tail = (
        '\n# The Disk Data Base\n#DDB\n\nddb.adapterType = "lsilogic"\n'
        'ddb.geometry.cylinders = "2"\nddb.geometry.heads = "16"\n'
        'ddb.geometry.sectors = "63"\nddb.virtualHWVersion = "4"\n'
    )
    seeds = {
        "flat.vmdk": head.format("monolithicFlat") + '\nRW 2048 FLAT "extent-flat.vmdk" 0\n',
        "twogb.vmdk": head.format("twoGbMaxExtentSparse")
        + '\nRW 2048 SPARSE "extent-sparse.vmdk"\nRW 2048 ZERO\n',
        "mixed.vmdk": head.format("custom")
        + '\nRW 1024 FLAT "extent-flat.vmdk" 1024\nRDONLY 2048 SPARSE "extent-sparse.vmdk"\n'
        + "NOACCESS 512 ZERO\n",
        "vmfs.vmdk": head.format("vmfs") + '\nRW 2048 VMFS "extent-flat.vmdk"\n',
        "delta.vmdk": head.replace("parentCID=ffffffff", "parentCID=87654321").format(
            "monolithicFlat"
        )
        + 'parentFileNameHint="backing.vmdk"\n\nRW 2048 FLAT "extent-flat.vmdk" 0\n',
    }
    out = []
    for name, text in seeds.items():
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(text + tail)
        out.append(path)
    return out


def make_disk_seeds(directory: str) -> list[str]:
    """A GPT disk and an MBR disk with an extended partition holding logicals."""
    os.makedirs(directory, exist_ok=True)
    gpt = _blank(os.path.join(directory, "gpt.img"), 4 << 20)
    subprocess.run(
        ["sgdisk", "-o", "-n1:2048:4095", "-t1:ef00", "-n2:4096:6143", "-c2:root", gpt],
        check=True,
        capture_output=True,
    )
    mbr = _blank(os.path.join(directory, "mbr.img"), 4 << 20)
    layout = "label: dos\n2048,1024,83\n3072,4096,5\n4096,512,83\n5120,512,82\n"
    subprocess.run(["sfdisk", "-q", mbr], input=layout.encode(), check=True, capture_output=True)
    return [gpt, mbr]


#: mkfs.xfs refuses filesystems under 300 MB unless it believes it runs under xfstests
_XFS_SMALL = {**os.environ, "TEST_DEV": "1", "TEST_DIR": "1", "QA_CHECK_FS": "1"}

FILESYSTEMS: dict[str, list[tuple[str, int, list[str]]]] = {
    # kind: [(file name, size, mkfs command)]
    "ext4": [
        ("ext2.img", 2 << 20, ["mkfs.ext2", "-q", "-F"]),
        ("ext4.img", 4 << 20, ["mkfs.ext4", "-q", "-F", "-O", "64bit,flex_bg"]),
        ("ext4-1k.img", 4 << 20, ["mkfs.ext4", "-q", "-F", "-b", "1024", "-O", "^64bit"]),
    ],
    "fat": [
        ("fat12.img", 1 << 20, ["mkfs.vfat", "-F", "12"]),
        ("fat16.img", 8 << 20, ["mkfs.vfat", "-F", "16", "-s", "1"]),
        ("fat32.img", 34 << 20, ["mkfs.vfat", "-F", "32"]),
    ],
    "ntfs": [("ntfs.img", 2 << 20, ["mkntfs", "-q", "-F", "-f"])],
    "xfs": [("xfs.img", 16 << 20, ["mkfs.xfs", "-q", "-f", "-b", "size=1024"])],
    "swap": [("swap.img", 1 << 20, ["mkswap"])],
}


def _trim(path: str) -> None:
    """Cut trailing zeros: targets read a filesystem seed as a larger zero-padded volume,
    so the fuzzer mutates only the bytes that say something."""
    with open(path, "rb") as f:
        data = f.read()
    end = len(data.rstrip(b"\0"))
    with open(path, "wb") as f:
        f.write(data[: -(-end // 512) * 512])


def make_fs_seeds(directory: str, kinds: tuple[str, ...] | None = None, *, trim: bool = False):
    """Small real filesystems made by mkfs (those whose tool is installed)."""
    os.makedirs(directory, exist_ok=True)
    made = []
    for kind, specs in FILESYSTEMS.items():
        if kinds is not None and kind not in kinds:
            continue
        for name, size, cmd in specs:
            path = _blank(os.path.join(directory, name), size)
            env = _XFS_SMALL if kind == "xfs" else None
            try:
                ok = subprocess.run([*cmd, path], capture_output=True, env=env).returncode == 0
            except FileNotFoundError:
                ok = False
            if not ok:
                os.unlink(path)
                continue
            if trim:
                _trim(path)
            made.append(path)
    return made


def make_lvm_seeds(directory: str) -> list[str]:
    """A physical volume's label and metadata (needs root and losetup); trimmed."""
    os.makedirs(directory, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("pvcreate") is None:
        return []
    path = _blank(os.path.join(directory, "pv.img"), 8 << 20)
    config = "--config=backup{backup=0 archive=0}"
    env = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}
    dev = subprocess.run(["losetup", "-f", "--show", path], capture_output=True, text=True)
    if dev.returncode != 0:
        os.unlink(path)
        return []
    loop = dev.stdout.strip()
    try:
        ok = (
            subprocess.run(
                ["pvcreate", "-qq", "-y", "-ff", config, loop], capture_output=True, env=env
            ).returncode
            == 0
            and subprocess.run(
                ["vgcreate", "-qq", config, f"p2vfuzz{os.getpid()}", loop],
                capture_output=True,
                env=env,
            ).returncode
            == 0
        )
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)
    if not ok:
        os.unlink(path)
        return []
    _trim(path)
    return [path]


# -- OVF and OVA --------------------------------------------------------------------------

MACHINES = [
    {
        "name": "web",
        "cpus": 2,
        "memory": 2 << 30,
        "firmware": "bios",
        "secure_boot": False,
        "os": "linux",
        "disks": [
            {
                "path": "web-disk1.vmdk",
                "format": "vmdk",
                "bus": "scsi",
                "size": 1 << 20,
                "file_size": 65536,
                "subformat": "streamOptimized",
            }
        ],
        "nics": [{"mac": "52:54:00:12:34:56", "model": "e1000", "network": "lan"}],
    },
    {
        "name": "db",
        "cpus": 4,
        "memory": 4 << 30,
        "firmware": "uefi",
        "secure_boot": False,
        "os": "windows",
        "disks": [
            {
                "path": "db-disk1.vmdk",
                "format": "vmdk",
                "bus": "sata",
                "size": 1 << 20,
                "file_size": 65536,
                "subformat": "streamOptimized",
            },
            {
                "path": "db-disk2.vmdk",
                "format": "vmdk",
                "bus": "ide",
                "size": 1 << 20,
                "file_size": 65536,
                "subformat": "streamOptimized",
            },
        ],
        "nics": [],
    },
]


def make_ovf_seeds(directory: str) -> list[str]:
    from formats.ovf import descriptor

    os.makedirs(directory, exist_ok=True)
    out = []
    for m in MACHINES:
        for version in ("1.0", "2.0"):
            for flavor in ("vmware", "virtualbox"):
                try:
                    data = descriptor.build(dict(m), version=version, flavor=flavor)
                except (ValueError, TypeError):
                    continue
                path = os.path.join(directory, f"{m['name']}-{version}-{flavor}.ovf")
                with open(path, "wb") as f:
                    f.write(data)
                out.append(path)
    return out


def make_ova_seeds(directory: str) -> list[str]:
    """OVAs of one and two small streamOptimized disks (made by qemu-img), with a SHA256
    and a SHA1 manifest."""
    from formats import ovf
    from formats.ovf import descriptor

    os.makedirs(directory, exist_ok=True)
    out = []
    with _staging(directory) as stage:
        raw = _source(os.path.join(stage, "src.raw"), 1 << 20)
        for m, digest in zip(MACHINES, ("sha256", "sha1")):
            files = []
            for d in m["disks"]:
                disk = os.path.join(stage, d["path"])
                subprocess.run(
                    [*QEMU_STREAM, raw, disk],
                    check=True,
                    capture_output=True,
                )
                files.append((d["path"], disk))
            machine = dict(m)
            machine["disks"] = [
                dict(d, file_size=os.path.getsize(p), subformat="streamOptimized")
                for d, (_, p) in zip(m["disks"], files)
            ]
            try:
                desc = descriptor.build(machine)
                path = os.path.join(directory, f"{m['name']}.ova")
                ovf.write_ova(path, f"{m['name']}.ovf", desc, files, digest=digest)
            except (ValueError, TypeError):
                continue
            out.append(path)
    return out


# -- the p2v agent protocol ---------------------------------------------------------------


def _response(status: int, flags: int, req_id: int, body: bytes) -> bytes:
    from p2v import protocol as P

    head = P.ResponseHeader.build(dict(status=status, flags=flags, id=req_id, length=len(body)))
    return head + body


def make_agent_reply_seeds(directory: str) -> list[str]:
    """Replies to the requests targets.agent_replies_target makes (ids 1..5: HELLO, READ
    zlib, HASH, READ raw, CLOSE), in order, out of order, and with refusals."""
    import hashlib

    from p2v import protocol as P

    os.makedirs(directory, exist_ok=True)
    block = bytes(range(256)) * 256  # the 64 KiB a READ asks for
    digest = hashlib.sha256(block).digest()
    hello = json.dumps({"version": P.VERSION, "digest": "sha256", "max_read": P.MAX_READ})
    hashes = b"".join(hashlib.sha256(bytes(65536)).digest() for _ in range(16))
    replies = {
        1: _response(P.STATUS_OK, 0, 1, hello.encode()),
        2: _response(P.STATUS_OK, P.DATA_ZLIB, 2, digest + zlib.compress(block, 1)),
        3: _response(P.STATUS_OK, 0, 3, hashes),
        4: _response(P.STATUS_OK, 0, 4, digest + block),
        5: _response(P.STATUS_OK, 0, 5, b""),
    }
    zero = _response(P.STATUS_OK, P.DATA_ZERO, 2, hashlib.sha256(bytes(65536)).digest())
    refused = _response(P.STATUS_INVALID, 0, 4, b"read: range is outside the device")
    seeds = {
        "in-order": b"".join(replies[i] for i in (1, 2, 3, 4, 5)),
        "reordered": b"".join(replies[i] for i in (3, 1, 5, 4, 2)),
        "zero-and-refused": replies[1] + zero + replies[3] + refused + replies[5],
        "failed": _response(P.STATUS_ERROR, 0, 1, b"OSError: gone"),
    }
    out = []
    for name, data in seeds.items():
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(data)
        out.append(path)
    return out


def make_agent_request_seeds(directory: str) -> list[str]:
    """Request streams for the agent: a whole session over the scratch disk, and the
    refusals (bad handle, range, chunk, JSON)."""
    import struct

    from p2v import protocol as P

    os.makedirs(directory, exist_ok=True)

    def req(op: int, req_id: int, body: bytes, flags: int = 0) -> bytes:
        head = P.RequestHeader.build(dict(op=op, flags=flags, id=req_id, length=len(body)))
        return head + body

    def js(args: dict) -> bytes:
        return json.dumps(args).encode()

    read = struct.Struct(">IQI")
    hsh = struct.Struct(">IQQI")
    session = [
        req(P.OP_HELLO, 1, js({})),
        req(P.OP_OPEN, 2, js({"path": "disk.img"})),
        req(P.OP_READ, 3, read.pack(1, 0, 65536), P.READ_ZLIB),
        req(P.OP_READ, 4, read.pack(1, 262144, 65536)),
        req(P.OP_HASH, 5, hsh.pack(1, 0, 524288, 65536)),
        req(P.OP_CLOSE, 6, struct.pack(">I", 1)),
        req(P.OP_BYE, 7, js({})),
    ]
    refusals = [
        req(P.OP_OPEN, 1, js({"path": "disk.img"})),
        req(P.OP_READ, 2, read.pack(9, 0, 512)),
        req(P.OP_READ, 3, read.pack(1, 1 << 40, 512)),
        req(P.OP_HASH, 4, hsh.pack(1, 0, 1 << 20, 100)),
        req(P.OP_FREEZE, 5, js({"mountpoint": "/nonexistent", "timeout": 5})),
        req(P.OP_SNAPSHOT, 6, js({"device": "/dev/vg/lv"})),
        req(P.OP_THAW, 7, b"[1, 2]"),
        req(99, 8, b""),
    ]
    seeds = {"session": b"".join(session), "refusals": b"".join(refusals)}
    out = []
    for name, data in seeds.items():
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(data)
        out.append(path)
    return out


# -- the migration wire protocol ----------------------------------------------------------


def make_migration_seeds(directory: str) -> list[str]:
    """A whole one-channel migration of a 64-page guest as the source sends it: raw,
    zero, delta and zstd/lz4 batches over two rounds, device state, END, GO."""
    import google_crc32c
    import numpy as np

    from live_migrate import pages as pg
    from live_migrate import wire
    from live_migrate.compression import compress
    from live_migrate.wire import Encoding, Feature, FrameType, PageKind

    os.makedirs(directory, exist_ok=True)
    ps, count = 4096, 64
    words = ps // 8
    rng = np.random.default_rng(9)
    mem = np.zeros((count, words), dtype=np.uint64)
    weights = pg.fingerprint_weights(ps)
    fp = np.zeros(count, dtype=np.uint64)

    def frames(encoding: Encoding) -> list[tuple[FrameType, bytes]]:
        nonlocal mem, fp
        mem[:] = 0
        fp[:] = 0
        out = []
        hello = wire.build_hello(
            ps, count, Feature.ZERO_PAGES | Feature.ZSTD | Feature.LZ4 | Feature.DELTA, 1
        )
        out.append((FrameType.HELLO, hello))

        def batch(round_no: int, entries: list[tuple[int, PageKind]]) -> bytes:
            pages = np.array([p for p, _ in entries], dtype=np.uint64)
            kinds = np.array([k for _, k in entries], dtype=np.uint8)
            full, masks, values = [], [], []
            for p, k in entries:
                if k is PageKind.FULL:
                    # small words: compressible, as most guest memory is
                    new = rng.integers(0, 1 << 12, words, dtype=np.uint64)
                    mem[p] = new
                    full.append(new.tobytes())
                elif k is PageKind.ZERO:
                    mem[p] = 0
                else:
                    new = mem[p].copy()
                    new[::37] = rng.integers(0, 1 << 63, len(new[::37]), dtype=np.uint64)
                    _, m, v = pg.delta_encode(new[None, :], mem[p][None, :], words)
                    masks.append(m.tobytes())
                    values.append(v.tobytes())
                    mem[p] = new
                fp[p] = pg.fingerprints(mem[p][None, :], weights)[0]
            data = b"".join(full) + b"".join(masks) + b"".join(values)
            enc = encoding
            stored = compress(enc, data) if enc is not Encoding.RAW else None
            if stored is None:
                enc, stored = Encoding.RAW, data
            delta_words = sum(len(v) // 8 for v in values)
            prefix = wire.build_batch_prefix(
                round_no,
                pages,
                kinds,
                int((kinds == PageKind.FULL).sum()),
                int((kinds == PageKind.DELTA).sum()),
                delta_words,
                enc,
                len(stored),
            )
            return b"".join(bytes(p) for p in prefix) + stored

        r0 = [(p, PageKind.FULL) for p in range(0, 8)] + [(9, PageKind.ZERO), (12, PageKind.FULL)]
        out.append((FrameType.BATCH, batch(0, r0)))
        out.append((FrameType.ROUND_END, wire.RoundEnd.build(dict(round=0, pages=len(r0)))))
        r1 = [(2, PageKind.DELTA), (3, PageKind.ZERO), (5, PageKind.DELTA), (40, PageKind.FULL)]
        out.append((FrameType.BATCH, batch(1, r1)))
        out.append((FrameType.ROUND_END, wire.RoundEnd.build(dict(round=1, pages=len(r1)))))
        state = b"device-state" * 10
        out.append(
            (
                FrameType.DEVICE_STATE,
                wire.DeviceState.build(dict(crc=google_crc32c.value(state), state=state)),
            )
        )
        end = dict(
            rounds=2,
            pages_sent=len(r0) + len(r1),
            memory_digest=pg.memory_digest(fp),
            device_state_length=len(state),
        )
        out.append((FrameType.END, wire.End.build(end)))
        out.append((FrameType.GO, b""))
        return out

    out = []
    for enc in (Encoding.RAW, Encoding.ZSTD, Encoding.LZ4):
        stream = b"".join(
            wire.build_frame_header(t, len(body), seq) + body
            for seq, (t, body) in enumerate(frames(enc))
        )
        path = os.path.join(directory, f"migration-{enc.name.lower()}")
        with open(path, "wb") as f:
            f.write(stream)
        out.append(path)
    return out


def make_corpus(kind: str, directory: str) -> list[str]:
    """The seeds of one kind (see targets.TARGETS[...].seeds)."""
    if kind in SEEDS:
        return make_seeds(kind, directory)
    if kind.endswith("-backing"):
        return make_backing_seeds(kind[: -len("-backing")], directory)
    if kind == "disk":
        return make_disk_seeds(directory)
    if kind == "fs":
        return make_fs_seeds(directory, trim=True)
    if kind == "fs-lvm":
        return make_lvm_seeds(directory)
    if kind.startswith("fs-"):
        return make_fs_seeds(directory, (kind[3:],), trim=True)
    builders = {
        "vmdk-descriptor": make_vmdk_descriptor_seeds,
        "ovf": make_ovf_seeds,
        "ova": make_ova_seeds,
        "agent-replies": make_agent_reply_seeds,
        "agent-requests": make_agent_request_seeds,
        "migration": make_migration_seeds,
    }
    return builders[kind](directory)
