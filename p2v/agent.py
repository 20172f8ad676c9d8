"""The p2v imaging agent: a block server that runs on the physical server for one clone.

It is sent over the SSH channel and run by the server's Python with nothing written to
the server's disks; it exits when its input closes. It must stay ONE stdlib-only file that
Python 2.6, 2.7 and 3.3+ all run (the servers people migrate are the old ones: RHEL 6 has
2.6, RHEL 7 and SLES 12 2.7), checked by vermin for each target, so it repeats the framing
constants that p2v/protocol.py declares for the controller (a test checks they agree).
Hence: %-formatting (2.6 has no "{}"), no concurrent.futures, and a fallback for each
newer call (os.pread, time.monotonic, os.cpu_count, subprocess.run) marked `novermin`.
Servers without any Python get p2v/shell_agent.py instead.

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

import binascii
import collections
import errno
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

try:
    TEXT = unicode  # noqa: F821 - Python 2: JSON strings are unicode
except NameError:
    TEXT = str

if hasattr(time, "monotonic"):
    monotonic = time.monotonic  # novermin - guarded: Python 2 falls back to time.time
else:
    monotonic = time.time


def cpu_count():
    try:
        import multiprocessing

        return multiprocessing.cpu_count()
    except (ImportError, NotImplementedError):
        return 1


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
        digest = hashlib.new(DIGEST, _zeros(length)).digest()
        if len(cache) < 64:
            cache[length] = digest
    return digest


_ZERO_CACHE = {}


def _zeros(n):
    """A zero bytes object of length n, kept for the few lengths requests use."""
    z = _ZERO_CACHE.get(n)
    if z is None:
        z = b"\0" * n  # bytes(n) is the text "n" under Python 2
        if len(_ZERO_CACHE) < 8:
            _ZERO_CACHE[n] = z
    return z


def _is_zero(data):
    # bytes == bytes is a memcmp: far faster than any per-byte test
    return data == _zeros(len(data))


def _utf8(text):
    if isinstance(text, TEXT):
        return text.encode("utf-8", "replace")
    return text  # Python 2's str is already bytes


def _run(argv, timeout=60):
    """Run a tool; return its stdout as text. Its output never reaches our stdout."""
    try:
        devnull = open(os.devnull, "rb")
        try:
            proc = subprocess.Popen(
                argv,
                stdin=devnull,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                universal_newlines=True,
            )
        finally:
            devnull.close()
    except OSError as exc:
        raise Failed("%s: %s" % (argv[0], exc))
    # communicate() takes no timeout before 3.3: a timer kills a tool that hangs
    timer = threading.Timer(timeout, _kill, (proc,))
    timer.daemon = True
    timer.start()
    try:
        out, err = proc.communicate()
    finally:
        timer.cancel()
    if proc.returncode != 0:
        raise Failed("%s failed (%s): %s" % (" ".join(argv), proc.returncode, err.strip()))
    return out


def _kill(proc):
    try:
        proc.kill()
    except OSError:
        pass


# -- inventory ----------------------------------------------------------------------


class Host(object):
    """The files and facts inventory reads. The agent reads this machine; on a server with
    no Python, p2v/shell_agent.py hands the same functions a copy of those files that
    shell tools dumped, so both modes describe a machine with the same code."""

    def read_bytes(self, path, limit=1 << 20):
        try:
            with open(path, "rb") as f:
                return f.read(limit)
        except (IOError, OSError):  # IOError: Python 2's open()
            return None

    def read_text(self, path, default=None):
        data = self.read_bytes(path)
        if data is None:
            return default
        try:
            return data.decode("utf-8").strip()
        except UnicodeDecodeError:
            return default

    def read_int(self, path, default=None):
        try:
            return int(self.read_text(path))
        except (TypeError, ValueError):
            return default

    def listdir(self, path):
        return os.listdir(path)

    def exists(self, path):
        return os.path.exists(path)

    def isdir(self, path):
        return os.path.isdir(path)

    def readlink(self, path):
        return os.readlink(path)

    def hostname(self):
        return socket.gethostname()

    def uname(self):
        u = os.uname()  # platform.uname() is a plain tuple before 2.7
        return {"release": u[2], "version": u[3], "machine": u[4]}

    def cpu_count(self):
        return cpu_count()

    def tool_json(self, argv):
        try:
            return json.loads(_run(argv, timeout=20))
        except (Failed, ValueError):
            return None

    def python(self):
        return platform.python_version()


LOCAL = Host()


SKIP_BLOCK_PREFIXES = ("loop", "ram", "zram", "sr", "fd", "dm-", "nbd", "md")


def list_disks(host=LOCAL):
    """Whole disks from /sys/block, with their partitions (sysfs sizes are 512-byte units)."""
    disks = []
    try:
        names = sorted(host.listdir("/sys/block"))
    except OSError:
        return disks
    for name in names:
        if name.startswith(SKIP_BLOCK_PREFIXES):
            continue
        base = "/sys/block/" + name
        sectors = host.read_int(base + "/size", 0)
        if not sectors:
            continue
        parts = []
        try:
            entries = sorted(host.listdir(base))
        except OSError:
            entries = []
        for entry in entries:
            if not entry.startswith(name) or not host.exists(base + "/" + entry + "/partition"):
                continue
            parts.append(
                {
                    "name": entry,
                    "number": host.read_int(base + "/" + entry + "/partition"),
                    "start": host.read_int(base + "/" + entry + "/start", 0) * 512,
                    "size": host.read_int(base + "/" + entry + "/size", 0) * 512,
                }
            )
        disks.append(
            {
                "name": name,
                "path": "/dev/" + name,
                "size": sectors * 512,
                "model": host.read_text(base + "/device/model"),
                "serial": host.read_text(base + "/device/serial") or host.read_text(base + "/serial"),
                "vendor": host.read_text(base + "/device/vendor"),
                "rotational": host.read_int(base + "/queue/rotational") == 1,
                "removable": host.read_int(base + "/removable") == 1,
                "logical_block_size": host.read_int(base + "/queue/logical_block_size", 512),
                "partitions": parts,
            }
        )
    return disks


def _lsblk(host):
    columns = "NAME,PATH,SIZE,TYPE,FSTYPE,MOUNTPOINT,PTTYPE,PARTTYPE,UUID,PKNAME"
    out = host.tool_json(["lsblk", "-J", "-b", "-o", columns])
    return out.get("blockdevices", []) if isinstance(out, dict) else None


def _nics(host):
    nics = []
    try:
        names = sorted(host.listdir("/sys/class/net"))
    except OSError:
        return nics
    addresses = {}
    try:
        for entry in host.tool_json(["ip", "-j", "addr", "show"]) or []:
            addresses[entry.get("ifname")] = [
                "%s/%s" % (a.get("local"), a.get("prefixlen"))
                for a in entry.get("addr_info", [])
                if a.get("local")
            ]
    except (ValueError, TypeError, AttributeError):
        pass
    for name in names:
        base = "/sys/class/net/" + name
        if name == "lo":
            continue
        driver = None
        try:
            driver = os.path.basename(host.readlink(base + "/device/driver"))
        except OSError:
            pass
        nics.append(
            {
                "name": name,
                "mac": host.read_text(base + "/address"),
                "state": host.read_text(base + "/operstate"),
                "mtu": host.read_int(base + "/mtu"),
                "speed": host.read_int(base + "/speed"),
                "driver": driver,
                # no device link: a bridge, bond, veth or tunnel, not a card to recreate
                "physical": host.exists(base + "/device"),
                "addresses": addresses.get(name, []),
            }
        )
    return nics


def _os_release(host):
    info = {}
    text = host.read_text("/etc/os-release") or host.read_text("/usr/lib/os-release") or ""
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            info[key.strip()] = value.strip().strip("\"'")
    return info


def _mem_total(host):
    for line in (host.read_text("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024
    return None


DMI_ENTRIES = "/sys/firmware/dmi/entries"
MEMORY_BLOCKS = "/sys/devices/system/memory"


def _memory(host):
    """Installed memory and where it was found: the DMI memory devices (what the
    firmware says is in the slots; root only), else the memory blocks the kernel
    manages, else MemTotal (which leaves out what the kernel reserved: a 1 GiB
    server reports ~960 MiB there). The sizes are decoded by the controller
    (p2v/inventory.py): the agent has no parsing intelligence."""
    dmi = []
    try:
        names = sorted(n for n in host.listdir(DMI_ENTRIES) if n.startswith("17-"))
    except OSError:
        names = []
    for name in names[:1024]:
        raw = host.read_bytes(DMI_ENTRIES + "/" + name + "/raw", 4096)
        if raw:
            dmi.append(binascii.hexlify(raw).decode("ascii"))
    blocks = 0
    try:
        blocks = len([n for n in host.listdir(MEMORY_BLOCKS) if n.startswith("memory")])
    except OSError:
        pass
    return {
        "dmi_type17": dmi,
        "block_size": host.read_text(MEMORY_BLOCKS + "/block_size_bytes"),
        "blocks": blocks,
        "mem_total": _mem_total(host),
    }


def _cpu(host):
    model = None
    sockets = set()
    for line in (host.read_text("/proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "physical id":
            sockets.add(value.strip())
    return {"count": host.cpu_count(), "model": model, "sockets": len(sockets) or 1}


def _mounts(host=LOCAL):
    mounts = []
    for line in (host.read_text("/proc/mounts") or "").splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0].startswith("/"):
            mounts.append({"device": fields[0], "mountpoint": fields[1], "fstype": fields[2]})
    return mounts


def inventory(host=LOCAL):
    return {
        "hostname": host.hostname(),
        "cpu": _cpu(host),
        "memory": _mem_total(host),  # what the kernel manages; installed memory is
        "memory_sources": _memory(host),  # decided by the controller from these
        "firmware": "uefi" if host.isdir("/sys/firmware/efi") else "bios",
        "disks": list_disks(host),
        "block_devices": _lsblk(host),
        "nics": _nics(host),
        "os": _os_release(host),
        "kernel": host.uname(),
        "mounts": _mounts(host),
        "python": host.python(),
    }


# -- devices ------------------------------------------------------------------------


class Device(object):
    def __init__(self, path):
        real = os.path.realpath(path)
        try:
            st = os.stat(real)
        except OSError as exc:
            raise Failed("%s: %s" % (path, exc.strerror))
        if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise Invalid("%s: neither a block device nor a file" % path)
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        try:
            try:
                self.fd = os.open(real, flags | getattr(os, "O_NOATIME", 0))
            except OSError as exc:
                if exc.errno != errno.EPERM:
                    raise
                # O_NOATIME needs ownership; root over sudo has it
                self.fd = os.open(real, flags)
        except OSError as exc:
            # the class name tells the controller to suggest --sudo (PermissionError
            # is what Python 3 calls it; Python 2 has only OSError)
            kind = "PermissionError: " if exc.errno in (errno.EACCES, errno.EPERM) else ""
            raise Failed("%s%s: %s" % (kind, path, exc.strerror))
        self.path = path
        self.kind = "block" if stat.S_ISBLK(st.st_mode) else "file"
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self.seek_lock = threading.Lock()  # for Pythons without os.pread

    def check_range(self, offset, length):
        if offset < 0 or length < 0 or offset + length > self.size:
            raise Invalid(
                "%s: range %#x+%#x is outside the device (%#x bytes)"
                % (self.path, offset, length, self.size)
            )

    def pread(self, offset, length):
        parts = []
        got = 0
        while got < length:
            try:
                chunk = self._pread(length - got, offset + got)
            except OSError as exc:
                raise Failed("%s: read at %#x: %s" % (self.path, offset + got, exc.strerror))
            if not chunk:
                raise Failed("%s: device shrank below %#x" % (self.path, offset + got))
            parts.append(chunk)
            got += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    if hasattr(os, "pread"):

        def _pread(self, n, offset):
            return os.pread(self.fd, n, offset)  # novermin - guarded by hasattr

    else:

        def _pread(self, n, offset):
            with self.seek_lock:
                os.lseek(self.fd, offset, os.SEEK_SET)
                return os.read(self.fd, n)

    def close(self):
        os.close(self.fd)


class _Pool(object):
    """A fixed set of worker threads (concurrent.futures is not in Python 2)."""

    def __init__(self, workers):
        # a deque and a condition: the queue module is named Queue in Python 2
        self.jobs = collections.deque()
        self.ready = threading.Condition()
        self.threads = []
        for _ in range(workers):
            t = threading.Thread(target=self._work)
            t.daemon = True
            t.start()
            self.threads.append(t)

    def _work(self):
        while True:
            with self.ready:
                while not self.jobs:
                    self.ready.wait()
                job = self.jobs.popleft()
            if job is None:
                return
            fn, args = job
            fn(*args)

    def submit(self, fn, *args):
        self._put((fn, args))

    def _put(self, job):
        with self.ready:
            self.jobs.append(job)
            self.ready.notify()

    def shutdown(self):
        for _ in self.threads:
            self._put(None)
        for t in self.threads:
            t.join()


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
        self.pool = _Pool(workers)
        self.policy = CompressionPolicy(min(workers, cpu_count()))
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
            started = monotonic()
            self.wfile.write(head)
            for part in parts:
                if part:
                    self.wfile.write(part)
            self.wfile.flush()
            if length >= 65536:
                self.policy.note_send(length, monotonic() - started)

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
            self.pool.shutdown()
            self.cleanup()

    def handle(self, op, flags, req_id, body):
        try:
            try:
                rflags, payload = self.dispatch(op, flags, body)
                status = STATUS_OK
            except Invalid as exc:
                status, rflags, payload = STATUS_INVALID, 0, _utf8(str(exc))
            except Failed as exc:
                status, rflags, payload = STATUS_ERROR, 0, _utf8(str(exc))
            except Exception as exc:  # noqa: BLE001 - report it; the agent keeps serving
                msg = "%s: %s" % (type(exc).__name__, exc)
                status, rflags, payload = STATUS_ERROR, 0, _utf8(msg)
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
            raise Invalid("unknown operation %s" % op)
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
            raise Invalid("no open device with handle %s" % handle)
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
        if not isinstance(path, (str, TEXT)) or not path:
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
            raise Invalid("no open device with handle %s" % handle)
        dev.close()
        return b""

    def op_read(self, flags, body):
        if len(body) != READ_BODY.size:
            raise Invalid("read: bad body")
        handle, offset, length = READ_BODY.unpack(body)
        if length > MAX_READ:
            raise Invalid("read: %d bytes asked, at most %d" % (length, MAX_READ))
        dev = self.device(handle)
        dev.check_range(offset, length)
        data = dev.pread(offset, length)
        if _is_zero(data):
            return DATA_ZERO, _zero_digest(length)
        digest = hashlib.new(DIGEST, data).digest()
        if flags & READ_ZLIB and self.policy.should_compress(data):
            started = monotonic()
            packed = zlib.compress(data, ZLIB_LEVEL)
            self.policy.note_compress(len(data), len(packed), monotonic() - started)
            if len(packed) <= len(data) * (1 - ZLIB_MIN_SAVING):
                return DATA_ZLIB, (digest, packed)
        return 0, (digest, data)

    def op_hash(self, body):
        if len(body) != HASH_BODY.size:
            raise Invalid("hash: bad body")
        handle, offset, length, chunk = HASH_BODY.unpack(body)
        if not MIN_HASH_CHUNK <= chunk <= MAX_HASH_CHUNK:
            raise Invalid("hash: chunk %d outside %d..%d" % (chunk, MIN_HASH_CHUNK, MAX_HASH_CHUNK))
        if length > MAX_HASH_SPAN or -(-length // chunk) > MAX_HASH_CHUNKS:
            raise Invalid("hash: %d bytes in chunks of %d is too many" % (length, chunk))
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
            raise Invalid("freeze: timeout must be 1..%d seconds" % MAX_FREEZE_SECONDS)
        with self.lock:
            if mountpoint in self.frozen:
                raise Invalid("%s is already frozen" % mountpoint)
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
            raise Invalid("%s is not frozen by this agent" % mountpoint)
        return {"thawed": mountpoint}

    def mountpoint(self, args):
        mp = args.get("mountpoint")
        if not isinstance(mp, (str, TEXT)) or not os.path.isabs(mp):
            raise Invalid("an absolute mountpoint is required")
        mp = os.path.realpath(mp)
        if not any(m["mountpoint"] == mp for m in _mounts()):
            raise Invalid("%s is not a mount point" % mp)
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
            sys.stderr.write("p2v-agent: %s\n" % exc)
        return True

    def op_snapshot(self, args):
        """An LVM snapshot of a logical volume, when its volume group has room for it."""
        device = args.get("device")
        if not isinstance(device, (str, TEXT)) or not device.startswith("/dev/"):
            raise Invalid("snapshot: a /dev path of a logical volume is required")
        fields = _run(
            ["lvs", "--noheadings", "--nosuffix", "--units", "b", "-o", "vg_name,lv_name,lv_size", device]
        ).split()
        if len(fields) != 3:
            raise Failed("%s is not an LVM logical volume" % device)
        vg, lv, lv_size = fields[0], fields[1], int(fields[2])
        free = int(_run(["vgs", "--noheadings", "--nosuffix", "--units", "b", "-o", "vg_free", vg]).split()[0])
        want = args.get("size")
        if not isinstance(want, int) or want <= 0:
            want = max(min(lv_size // 10, 8 << 30), 64 << 20)
        if free < want:
            raise Failed(
                "volume group %s has %d bytes free; a snapshot of %s needs %d" % (vg, free, device, want)
            )
        name = "p2v-snap-%d-%d" % (os.getpid(), len(self.snapshots) + 1)
        _run(["lvcreate", "-q", "-s", "-n", name, "-L", "%db" % want, "%s/%s" % (vg, lv)], timeout=120)
        snap = "/dev/%s/%s" % (vg, name)
        with self.lock:
            self.snapshots.append(snap)
        return {"snapshot": snap, "size": want, "origin": device}

    def op_drop_snapshot(self, args):
        snap = args.get("snapshot")
        with self.lock:
            if snap not in self.snapshots:
                raise Invalid("%s was not made by this agent" % snap)
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
                sys.stderr.write("p2v-agent: %s\n" % exc)
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
    started = monotonic()
    agent = Agent(rfile, wfile, workers=min(8, max(2, cpu_count())))
    try:
        agent.serve()
    except KeyboardInterrupt:
        pass
    sys.stderr.write("p2v-agent: done after %.1fs\n" % (monotonic() - started))


if __name__ == "__main__":
    main()
