"""The p2v imaging agent: a block server that runs on the physical server for one clone.

It is sent over the SSH channel and run by `python3` with nothing written to the server's
disks; it exits when its input closes. It must stay ONE stdlib-only file that any Python
>= 3.6 runs (tests check the syntax level with vermin), so it repeats the framing
constants that p2v/protocol.py declares for the controller (a test checks they agree).

Wire format, stdin -> stdout, big-endian:

    request  = MAGIC(2) op(1) flags(1) id(4) length(4) body[length]
    response = MAGIC(2) status(1) flags(1) id(4) length(4) body[length]

Responses carry the id of their request and may come out of order: READ and HASH run on
a small thread pool so the disk, zlib and sha256 (which release the GIL) work in
parallel. Control requests take and return JSON. The agent has no parsing intelligence:
partition tables and filesystems are read by the controller through READ.

Devices and files are opened read-only. Every request is validated: ranges must lie
inside the opened device, sizes are capped, bodies are bounded; a bad request gets an
error response, a broken frame ends the session.
"""

import concurrent.futures
import hashlib
import json
import os
import platform
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib

MAGIC = b"PV"
VERSION = 1
HEADER = struct.Struct(">2sBBII")

OP_HELLO = 1
OP_INVENTORY = 2
OP_DISKS = 3
OP_OPEN = 4
OP_CLOSE = 5
OP_READ = 6
OP_HASH = 7
OP_FREEZE = 8
OP_THAW = 9
OP_SNAPSHOT = 10
OP_DROP_SNAPSHOT = 11
OP_BYE = 12

STATUS_OK = 0
STATUS_ERROR = 1  # the request was valid but failed (I/O error, tool failed)
STATUS_INVALID = 2  # the request itself is wrong (range, size, unknown op)

# READ request flags
READ_ZLIB = 1
# READ response flags
DATA_ZLIB = 1
DATA_ZERO = 2  # the range is all zeros: no payload follows the digest

READ_BODY = struct.Struct(">IQI")  # handle, offset, length
HASH_BODY = struct.Struct(">IQQI")  # handle, offset, length, chunk
HANDLE_BODY = struct.Struct(">I")

MAX_REQUEST_BODY = 1 << 20
MAX_READ = 8 << 20
MIN_HASH_CHUNK = 4096
MAX_HASH_CHUNK = 64 << 20
MAX_HASH_CHUNKS = 1 << 16
MAX_HASH_SPAN = 4 << 30
MAX_IN_FLIGHT = 64
DIGEST = "sha256"
DIGEST_SIZE = 32
#: a filesystem left frozen by a lost controller would hang the server's writers
MAX_FREEZE_SECONDS = 600
ZLIB_LEVEL = 1
#: keep compressed data only when it saves at least this fraction
ZLIB_MIN_SAVING = 0.1


class Invalid(Exception):
    """A request the agent refuses (answered with STATUS_INVALID)."""


class Failed(Exception):
    """A valid request that could not be carried out (answered with STATUS_ERROR)."""


def _zero_digest(length, cache={}):  # noqa: B006 - a deliberate per-process cache
    digest = cache.get(length)
    if digest is None:
        digest = hashlib.new(DIGEST, bytes(length)).digest()
        if len(cache) < 64:
            cache[length] = digest
    return digest


_ZERO_CACHE = {}


def _zeros(n):
    """A zero bytes object of length n, kept for the few lengths requests use."""
    z = _ZERO_CACHE.get(n)
    if z is None:
        z = bytes(n)
        if len(_ZERO_CACHE) < 8:
            _ZERO_CACHE[n] = z
    return z


def _is_zero(data):
    # bytes == bytes is a memcmp: far faster than any per-byte test
    return data == _zeros(len(data))


def _run(argv, timeout=60):
    """Run a tool; return its stdout as text. Its output never reaches our stdout."""
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            universal_newlines=True,
            timeout=timeout,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise Failed("{}: {}".format(argv[0], exc))
    if proc.returncode != 0:
        raise Failed("{} failed ({}): {}".format(" ".join(argv), proc.returncode, proc.stderr.strip()))
    return proc.stdout


def _read_text(path, default=None):
    try:
        with open(path) as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return default


def _read_int(path, default=None):
    text = _read_text(path)
    try:
        return int(text)
    except (TypeError, ValueError):
        return default


# -- inventory ----------------------------------------------------------------------

SKIP_BLOCK_PREFIXES = ("loop", "ram", "zram", "sr", "fd", "dm-", "nbd", "md")


def list_disks():
    """Whole disks from /sys/block, with their partitions (sysfs sizes are 512-byte units)."""
    disks = []
    try:
        names = sorted(os.listdir("/sys/block"))
    except OSError:
        return disks
    for name in names:
        if name.startswith(SKIP_BLOCK_PREFIXES):
            continue
        base = "/sys/block/" + name
        sectors = _read_int(base + "/size", 0)
        if not sectors:
            continue
        parts = []
        try:
            entries = sorted(os.listdir(base))
        except OSError:
            entries = []
        for entry in entries:
            if not entry.startswith(name) or not os.path.exists(base + "/" + entry + "/partition"):
                continue
            parts.append(
                {
                    "name": entry,
                    "number": _read_int(base + "/" + entry + "/partition"),
                    "start": _read_int(base + "/" + entry + "/start", 0) * 512,
                    "size": _read_int(base + "/" + entry + "/size", 0) * 512,
                }
            )
        disks.append(
            {
                "name": name,
                "path": "/dev/" + name,
                "size": sectors * 512,
                "model": _read_text(base + "/device/model"),
                "serial": _read_text(base + "/device/serial") or _read_text(base + "/serial"),
                "vendor": _read_text(base + "/device/vendor"),
                "rotational": _read_int(base + "/queue/rotational") == 1,
                "removable": _read_int(base + "/removable") == 1,
                "logical_block_size": _read_int(base + "/queue/logical_block_size", 512),
                "partitions": parts,
            }
        )
    return disks


def _lsblk():
    columns = "NAME,PATH,SIZE,TYPE,FSTYPE,MOUNTPOINT,PTTYPE,PARTTYPE,UUID,PKNAME"
    try:
        out = _run(["lsblk", "-J", "-b", "-o", columns], timeout=20)
        return json.loads(out).get("blockdevices", [])
    except (Failed, ValueError):
        return None


def _nics():
    nics = []
    try:
        names = sorted(os.listdir("/sys/class/net"))
    except OSError:
        return nics
    addresses = {}
    try:
        for entry in json.loads(_run(["ip", "-j", "addr", "show"], timeout=10)):
            addresses[entry.get("ifname")] = [
                "{}/{}".format(a.get("local"), a.get("prefixlen"))
                for a in entry.get("addr_info", [])
                if a.get("local")
            ]
    except (Failed, ValueError, TypeError, AttributeError):
        pass
    for name in names:
        base = "/sys/class/net/" + name
        if name == "lo":
            continue
        driver = None
        try:
            driver = os.path.basename(os.readlink(base + "/device/driver"))
        except OSError:
            pass
        nics.append(
            {
                "name": name,
                "mac": _read_text(base + "/address"),
                "state": _read_text(base + "/operstate"),
                "mtu": _read_int(base + "/mtu"),
                "speed": _read_int(base + "/speed"),
                "driver": driver,
                # no device link: a bridge, bond, veth or tunnel, not a card to recreate
                "physical": os.path.exists(base + "/device"),
                "addresses": addresses.get(name, []),
            }
        )
    return nics


def _os_release():
    info = {}
    text = _read_text("/etc/os-release") or _read_text("/usr/lib/os-release") or ""
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            info[key.strip()] = value.strip().strip("\"'")
    return info


def _memory():
    for line in (_read_text("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024
    return None


def _cpu():
    model = None
    sockets = set()
    for line in (_read_text("/proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "physical id":
            sockets.add(value.strip())
    return {"count": os.cpu_count(), "model": model, "sockets": len(sockets) or 1}


def _mounts():
    mounts = []
    for line in (_read_text("/proc/mounts") or "").splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0].startswith("/"):
            mounts.append({"device": fields[0], "mountpoint": fields[1], "fstype": fields[2]})
    return mounts


def inventory():
    uname = platform.uname()
    return {
        "hostname": socket.gethostname(),
        "cpu": _cpu(),
        "memory": _memory(),
        "firmware": "uefi" if os.path.isdir("/sys/firmware/efi") else "bios",
        "disks": list_disks(),
        "block_devices": _lsblk(),
        "nics": _nics(),
        "os": _os_release(),
        "kernel": {"release": uname.release, "version": uname.version, "machine": uname.machine},
        "mounts": _mounts(),
        "python": platform.python_version(),
    }


# -- devices ------------------------------------------------------------------------


class Device(object):
    def __init__(self, path):
        real = os.path.realpath(path)
        try:
            st = os.stat(real)
        except OSError as exc:
            raise Failed("{}: {}".format(path, exc.strerror))
        if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise Invalid("{}: neither a block device nor a file".format(path))
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(real, flags | getattr(os, "O_NOATIME", 0))
        except PermissionError:
            self.fd = os.open(real, flags)  # O_NOATIME needs ownership; root over sudo has it
        except OSError as exc:
            raise Failed("{}: {}".format(path, exc.strerror))
        self.path = path
        self.kind = "block" if stat.S_ISBLK(st.st_mode) else "file"
        self.size = os.lseek(self.fd, 0, os.SEEK_END)

    def check_range(self, offset, length):
        if offset < 0 or length < 0 or offset + length > self.size:
            raise Invalid(
                "{}: range {:#x}+{:#x} is outside the device ({:#x} bytes)".format(
                    self.path, offset, length, self.size
                )
            )

    def pread(self, offset, length):
        parts = []
        got = 0
        while got < length:
            try:
                chunk = os.pread(self.fd, length - got, offset + got)
            except OSError as exc:
                raise Failed("{}: read at {:#x}: {}".format(self.path, offset + got, exc.strerror))
            if not chunk:
                raise Failed("{}: device shrank below {:#x}".format(self.path, offset + got))
            parts.append(chunk)
            got += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self):
        os.close(self.fd)


# -- the server ---------------------------------------------------------------------


class CompressionPolicy(object):
    """Compress a block only when that is quicker than sending it as it is.

    zlib costs CPU on the server; it pays only when the link is the bottleneck. Sending
    time per byte is measured on our own writes (they block when the SSH window is full)
    and compression time per byte on our own compressions; a block is compressed when
    the time zlib takes (spread over the cores) is less than the sending time it saves.
    Every 16th candidate block is compressed anyway to keep the estimates current, and a
    block whose first 8 KiB do not compress (media, archives, random) is sent as it is.
    """

    SAMPLE = 8192
    PROBE_EVERY = 16
    WEIGHT = 0.2

    def __init__(self, cores):
        self.cores = max(1, cores)
        self.lock = threading.Lock()
        self.send_cost = None  # seconds per byte sent
        self.zlib_cost = None  # seconds per byte compressed
        self.ratio = 0.5  # compressed size / raw size
        self.count = 0

    def _mix(self, old, new):
        return new if old is None else old + self.WEIGHT * (new - old)

    def note_send(self, nbytes, seconds):
        with self.lock:
            self.send_cost = self._mix(self.send_cost, seconds / nbytes)

    def note_compress(self, nbytes, packed, seconds):
        with self.lock:
            self.zlib_cost = self._mix(self.zlib_cost, seconds / nbytes)
            self.ratio = self._mix(self.ratio, min(1.0, packed / float(nbytes)))

    def should_compress(self, data):
        if len(data) > self.SAMPLE:
            sample = data[: self.SAMPLE]
            if len(zlib.compress(sample, ZLIB_LEVEL)) > self.SAMPLE * (1 - ZLIB_MIN_SAVING):
                return False
        with self.lock:
            self.count += 1
            if self.send_cost is None or self.zlib_cost is None:
                return True
            if self.count % self.PROBE_EVERY == 0:
                return True
            saved = self.send_cost * (1 - self.ratio)
            return self.zlib_cost / self.cores < saved


class Agent(object):
    def __init__(self, rfile, wfile, workers=4):
        self.rfile = rfile
        self.wfile = wfile
        self.write_lock = threading.Lock()
        self.devices = {}
        self.next_handle = 1
        self.frozen = {}  # mountpoint -> watchdog timer
        self.snapshots = []
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)
        self.pool = concurrent.futures.ThreadPoolExecutor(workers)
        self.policy = CompressionPolicy(min(workers, os.cpu_count() or 1))
        self.running = True

    # framing
    def read_exact(self, n):
        data = b""
        while len(data) < n:
            chunk = self.rfile.read(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def send(self, req_id, status, flags, body):
        parts = body if isinstance(body, tuple) else (body,)
        length = sum(len(p) for p in parts)
        head = HEADER.pack(MAGIC, status, flags, req_id, length)
        with self.write_lock:
            started = time.monotonic()
            self.wfile.write(head)
            for part in parts:
                if part:
                    self.wfile.write(part)
            self.wfile.flush()
            if length >= 65536:
                self.policy.note_send(length, time.monotonic() - started)

    def serve(self):
        try:
            while self.running:
                head = self.read_exact(HEADER.size)
                if head is None:
                    break
                magic, op, flags, req_id, length = HEADER.unpack(head)
                if magic != MAGIC or length > MAX_REQUEST_BODY:
                    # the stream is out of step; nothing after this can be trusted
                    self.send(req_id, STATUS_INVALID, 0, b"broken frame: agent stops")
                    break
                body = self.read_exact(length) if length else b""
                if body is None:
                    break
                self.slots.acquire()
                if op in (OP_READ, OP_HASH):
                    self.pool.submit(self.handle, op, flags, req_id, body)
                else:
                    self.handle(op, flags, req_id, body)
        finally:
            self.pool.shutdown(wait=True)
            self.cleanup()

    def handle(self, op, flags, req_id, body):
        try:
            try:
                rflags, payload = self.dispatch(op, flags, body)
                status = STATUS_OK
            except Invalid as exc:
                status, rflags, payload = STATUS_INVALID, 0, str(exc).encode("utf-8", "replace")
            except Failed as exc:
                status, rflags, payload = STATUS_ERROR, 0, str(exc).encode("utf-8", "replace")
            except Exception as exc:  # noqa: BLE001 - report it; the agent keeps serving
                msg = "{}: {}".format(type(exc).__name__, exc)
                status, rflags, payload = STATUS_ERROR, 0, msg.encode("utf-8", "replace")
            try:
                self.send(req_id, status, rflags, payload)
            except (OSError, ValueError):
                self.running = False
        finally:
            self.slots.release()

    def dispatch(self, op, flags, body):
        if op == OP_READ:
            return self.op_read(flags, body)
        if op == OP_HASH:
            return 0, self.op_hash(body)
        if op == OP_CLOSE:
            return 0, self.op_close(body)
        handlers = {
            OP_HELLO: self.op_hello,
            OP_INVENTORY: lambda args: inventory(),
            OP_DISKS: lambda args: list_disks(),
            OP_OPEN: self.op_open,
            OP_FREEZE: self.op_freeze,
            OP_THAW: self.op_thaw,
            OP_SNAPSHOT: self.op_snapshot,
            OP_DROP_SNAPSHOT: self.op_drop_snapshot,
            OP_BYE: self.op_bye,
        }
        handler = handlers.get(op)
        if handler is None:
            raise Invalid("unknown operation {}".format(op))
        try:
            args = json.loads(body.decode("utf-8")) if body else {}
        except ValueError:
            raise Invalid("request body is not JSON")
        if not isinstance(args, dict):
            raise Invalid("request body must be a JSON object")
        return 0, json.dumps(handler(args)).encode("utf-8")

    def device(self, handle):
        dev = self.devices.get(handle)
        if dev is None:
            raise Invalid("no open device with handle {}".format(handle))
        return dev

    # operations
    def op_hello(self, args):
        return {
            "version": VERSION,
            "python": platform.python_version(),
            "pid": os.getpid(),
            "uid": os.geteuid(),
            "digest": DIGEST,
            "max_read": MAX_READ,
            "max_hash_chunks": MAX_HASH_CHUNKS,
        }

    def op_open(self, args):
        path = args.get("path")
        if not isinstance(path, str) or not path:
            raise Invalid("open: a path is required")
        dev = Device(path)
        with self.lock:
            handle = self.next_handle
            self.next_handle += 1
            self.devices[handle] = dev
        return {"handle": handle, "size": dev.size, "kind": dev.kind, "path": path}

    def op_close(self, body):
        if len(body) != HANDLE_BODY.size:
            raise Invalid("close: bad body")
        (handle,) = HANDLE_BODY.unpack(body)
        with self.lock:
            dev = self.devices.pop(handle, None)
        if dev is None:
            raise Invalid("no open device with handle {}".format(handle))
        dev.close()
        return b""

    def op_read(self, flags, body):
        if len(body) != READ_BODY.size:
            raise Invalid("read: bad body")
        handle, offset, length = READ_BODY.unpack(body)
        if length > MAX_READ:
            raise Invalid("read: {} bytes asked, at most {}".format(length, MAX_READ))
        dev = self.device(handle)
        dev.check_range(offset, length)
        data = dev.pread(offset, length)
        if _is_zero(data):
            return DATA_ZERO, _zero_digest(length)
        digest = hashlib.new(DIGEST, data).digest()
        if flags & READ_ZLIB and self.policy.should_compress(data):
            started = time.monotonic()
            packed = zlib.compress(data, ZLIB_LEVEL)
            self.policy.note_compress(len(data), len(packed), time.monotonic() - started)
            if len(packed) <= len(data) * (1 - ZLIB_MIN_SAVING):
                return DATA_ZLIB, (digest, packed)
        return 0, (digest, data)

    def op_hash(self, body):
        if len(body) != HASH_BODY.size:
            raise Invalid("hash: bad body")
        handle, offset, length, chunk = HASH_BODY.unpack(body)
        if not MIN_HASH_CHUNK <= chunk <= MAX_HASH_CHUNK:
            raise Invalid("hash: chunk {} outside {}..{}".format(chunk, MIN_HASH_CHUNK, MAX_HASH_CHUNK))
        if length > MAX_HASH_SPAN or -(-length // chunk) > MAX_HASH_CHUNKS:
            raise Invalid("hash: {} bytes in chunks of {} is too many".format(length, chunk))
        dev = self.device(handle)
        dev.check_range(offset, length)
        out = []
        pos, end = offset, offset + length
        while pos < end:
            n = min(chunk, end - pos)
            h = None
            done = 0
            all_zero = True
            while done < n:
                step = min(n - done, MAX_READ)
                data = dev.pread(pos + done, step)
                if all_zero and _is_zero(data):
                    done += step
                    continue
                if h is None:
                    h = hashlib.new(DIGEST)
                    if done:  # the zeros skipped so far are part of the chunk
                        zero_fill(h, done)
                all_zero = False
                h.update(data)
                done += step
            out.append(_zero_digest(n) if h is None else h.digest())
            pos += n
        return b"".join(out)

    def op_freeze(self, args):
        mountpoint = self.mountpoint(args)
        timeout = args.get("timeout", 60)
        if not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_FREEZE_SECONDS:
            raise Invalid("freeze: timeout must be 1..{} seconds".format(MAX_FREEZE_SECONDS))
        with self.lock:
            if mountpoint in self.frozen:
                raise Invalid("{} is already frozen".format(mountpoint))
        _run(["fsfreeze", "--freeze", mountpoint])
        timer = threading.Timer(timeout, self.thaw, (mountpoint,))
        timer.daemon = True
        with self.lock:
            self.frozen[mountpoint] = timer
        timer.start()
        return {"frozen": mountpoint, "timeout": timeout}

    def op_thaw(self, args):
        mountpoint = self.mountpoint(args)
        if not self.thaw(mountpoint):
            raise Invalid("{} is not frozen by this agent".format(mountpoint))
        return {"thawed": mountpoint}

    def mountpoint(self, args):
        mp = args.get("mountpoint")
        if not isinstance(mp, str) or not os.path.isabs(mp):
            raise Invalid("an absolute mountpoint is required")
        mp = os.path.realpath(mp)
        if not any(m["mountpoint"] == mp for m in _mounts()):
            raise Invalid("{} is not a mount point".format(mp))
        return mp

    def thaw(self, mountpoint):
        with self.lock:
            timer = self.frozen.pop(mountpoint, None)
        if timer is None:
            return False
        timer.cancel()
        try:
            _run(["fsfreeze", "--unfreeze", mountpoint])
        except Failed as exc:
            sys.stderr.write("p2v-agent: {}\n".format(exc))
        return True

    def op_snapshot(self, args):
        """An LVM snapshot of a logical volume, when its volume group has room for it."""
        device = args.get("device")
        if not isinstance(device, str) or not device.startswith("/dev/"):
            raise Invalid("snapshot: a /dev path of a logical volume is required")
        fields = _run(
            ["lvs", "--noheadings", "--nosuffix", "--units", "b", "-o", "vg_name,lv_name,lv_size", device]
        ).split()
        if len(fields) != 3:
            raise Failed("{} is not an LVM logical volume".format(device))
        vg, lv, lv_size = fields[0], fields[1], int(fields[2])
        free = int(_run(["vgs", "--noheadings", "--nosuffix", "--units", "b", "-o", "vg_free", vg]).split()[0])
        want = args.get("size")
        if not isinstance(want, int) or want <= 0:
            want = max(min(lv_size // 10, 8 << 30), 64 << 20)
        if free < want:
            raise Failed(
                "volume group {} has {} bytes free; a snapshot of {} needs {}".format(vg, free, device, want)
            )
        name = "p2v-snap-{}-{}".format(os.getpid(), len(self.snapshots) + 1)
        _run(["lvcreate", "-q", "-s", "-n", name, "-L", "{}b".format(want), "{}/{}".format(vg, lv)], timeout=120)
        snap = "/dev/{}/{}".format(vg, name)
        with self.lock:
            self.snapshots.append(snap)
        return {"snapshot": snap, "size": want, "origin": device}

    def op_drop_snapshot(self, args):
        snap = args.get("snapshot")
        with self.lock:
            if snap not in self.snapshots:
                raise Invalid("{} was not made by this agent".format(snap))
            self.snapshots.remove(snap)
        _run(["lvremove", "-q", "-f", snap], timeout=120)
        return {"dropped": snap}

    def op_bye(self, args):
        self.running = False
        return {}

    def cleanup(self):
        for mountpoint in list(self.frozen):
            self.thaw(mountpoint)
        for dev in list(self.devices.values()):
            try:
                dev.close()
            except OSError:
                pass
        self.devices.clear()
        for snap in list(self.snapshots):
            try:
                _run(["lvremove", "-q", "-f", snap], timeout=120)
            except Failed as exc:
                sys.stderr.write("p2v-agent: {}\n".format(exc))
        self.snapshots = []


def zero_fill(h, n):
    while n > 0:
        step = min(n, MAX_READ)
        h.update(_zeros(step))
        n -= step


def main():
    rfile = getattr(sys.stdin, "buffer", sys.stdin)
    wfile = getattr(sys.stdout, "buffer", sys.stdout)
    # nothing else may write to the protocol stream: send stray prints to stderr
    sys.stdout = sys.stderr
    started = time.monotonic()
    agent = Agent(rfile, wfile, workers=min(8, max(2, os.cpu_count() or 2)))
    try:
        agent.serve()
    except KeyboardInterrupt:
        pass
    sys.stderr.write("p2v-agent: done after {:.1f}s\n".format(time.monotonic() - started))


if __name__ == "__main__":
    main()
