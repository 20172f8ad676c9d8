"""A libguestfs appliance over one machine's disks: the small API every guest module
(and drivers/guest/lxc.py) works through.

    with Appliance([(path, fmt), ...], readonly=True) as app:
        root = app.inspect()          # the guest's root filesystem (one OS, or an error)
        app.mount(root)               # the guest's filesystems, as its fstab mounts them
        text = app.read_text("/etc/fstab")
        app.run(["update-initramfs", "-u"], step="initramfs")   # inside the guest's root

The appliance is a small VM (supermin builds it from the host's kernel and packages):
the guest's files are only ever opened inside it, so a guest's symlink resolves inside
the guest, and nothing on the host is touched. Its network stays off (libguestfs's
default, set again here): no conversion step needs one. KVM is used when it works, else
TCG (a launch that fails under KVM, as nested KVM does on some hosts, is retried under
TCG and the choice remembered per host kernel).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from typing import Any

from .errors import GuestError

#: the largest configuration file read from a guest: a hostile guest may hold huge ones
MAX_CONFIG = 1 << 20
#: memory for the appliance: update-initramfs and dracut run inside it
MEMORY_MIB = 1024
NO_OS = "no operating system found"
_ACCEL_ENV = "P2V_GUESTFS_ACCEL"  # kvm or tcg: skip the probe


def _accel_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "p2v", f"guestfs-accel-{platform.release()}")


def _preferred_accel() -> str:
    forced = os.environ.get(_ACCEL_ENV, "").lower()
    if forced in ("kvm", "tcg"):
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    try:
        with open(_accel_cache()) as f:
            return f.read().strip() or "kvm"
    except OSError:
        return "kvm"


def _remember_accel(accel: str) -> None:
    try:
        os.makedirs(os.path.dirname(_accel_cache()), exist_ok=True)
        with open(_accel_cache(), "w") as f:
            f.write(accel)
    except OSError:
        pass  # only a cache: the next run probes again


def _import_guestfs() -> Any:
    try:
        import guestfs
    except ImportError as exc:
        raise GuestError(
            "appliance",
            "libguestfs's Python binding is missing (Debian: apt install python3-guestfs "
            "libguestfs-tools; `make deps` installs it)",
        ) from exc
    return guestfs


class Appliance:
    """libguestfs over `disks` ((path, format) in the machine's disk order: the guest's
    first disk is the appliance's /dev/sda). `readonly` adds them read-only (libguestfs
    keeps its writes in a throw-away overlay); otherwise writes go to the files given,
    which drivers/guest makes overlays of the real images (overlay.py)."""

    def __init__(self, disks: Sequence[tuple[str, str | None]], *, readonly: bool) -> None:
        if not disks:
            raise GuestError("appliance", "no disk image given")
        self.disks = list(disks)
        self.readonly = readonly
        self.g: Any = None
        self.accel = ""

    def _handle(self, accel: str) -> Any:
        guestfs = _import_guestfs()
        g = guestfs.GuestFS(python_return_dict=True, close_on_exit=False)
        g.set_backend("direct")
        if accel == "tcg":
            g.set_backend_settings(["force_tcg"])
        g.set_network(False)
        g.set_memsize(MEMORY_MIB)
        g.set_smp(max(1, min(2, os.cpu_count() or 1)))
        for path, fmt in self.disks:
            opts: dict[str, Any] = {"readonly": self.readonly}
            if fmt:
                opts["format"] = "raw" if fmt == "raw" else ("vpc" if fmt == "vhd" else fmt)
            g.add_drive_opts(path, **opts)
        return g

    def launch(self) -> None:
        accel = _preferred_accel()
        g = self._handle(accel)
        try:
            g.launch()
        except RuntimeError as exc:
            g.close()
            if accel == "tcg":
                raise GuestError("appliance", f"libguestfs did not start: {exc}") from exc
            accel = "tcg"
            g = self._handle(accel)
            try:
                g.launch()
            except RuntimeError as exc2:
                g.close()
                raise GuestError("appliance", f"libguestfs did not start: {exc2}") from exc2
            _remember_accel(accel)
        self.g, self.accel = g, accel

    def __enter__(self) -> Appliance:
        self.launch()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Unmount and stop the appliance; its writes are flushed to the disks first."""
        if self.g is None:
            return
        g, self.g = self.g, None
        try:
            g.umount_all()
            g.shutdown()
        finally:
            g.close()

    # -- finding and mounting the guest --------------------------------------------------
    def devices(self) -> list[str]:
        """The appliance's names of the machine's disks, in the order given."""
        return list(self.g.list_devices())

    def inspect(self) -> str:
        """The root filesystem of the one OS on these disks."""
        roots = self.g.inspect_os()
        if len(roots) == 1:
            return roots[0]
        if len(roots) > 1:
            raise GuestError(
                "inspect", f"{len(roots)} operating systems on these disks ({', '.join(roots)})"
            )
        locked = []
        for dev in [*self.g.list_devices(), *self.g.list_partitions()]:
            try:
                if self.g.vfs_type(dev) == "crypto_LUKS":
                    locked.append(dev)
            except RuntimeError:
                continue  # nothing blkid knows on it
        if locked:
            raise GuestError(
                "inspect",
                f"{NO_OS} outside encrypted volumes ({', '.join(locked)}); "
                "an encrypted root needs its key, which p2v does not take yet",
            )
        raise GuestError("inspect", f"{NO_OS} on these disks")

    def mount(self, root: str) -> list[tuple[str, str]]:
        """Mount the guest's filesystems (root first, then by depth) and return
        (mountpoint, device) pairs; a non-root filesystem that will not mount is skipped."""
        points = self.g.inspect_get_mountpoints(root)
        order = sorted(points.items(), key=lambda kv: (len(kv[0].rstrip("/")), kv[0]))
        mounted = []
        for mp, dev in order:
            try:
                self._mount_one(dev, mp)
            except RuntimeError as exc:
                if mp == "/":
                    raise GuestError("mount", f"the root filesystem {dev}: {exc}") from exc
                continue
            mounted.append((mp, dev))
        return mounted

    def _mount_one(self, dev: str, mp: str) -> None:
        opts = "ro" if self.readonly else ""
        if dev.startswith("btrfsvol:"):
            # libguestfs names a btrfs subvolume btrfsvol:/dev/sda2/@home
            rest = dev[len("btrfsvol:") :]
            parts = rest.split("/")
            dev, subvol = "/".join(parts[:3]), "/".join(parts[3:])
            opts = ",".join(o for o in (opts, f"subvol={subvol}") if o)
        if mp != "/" and not self.g.is_dir(mp):
            raise RuntimeError(f"mount point {mp} is not a directory in the guest")
        self.g.mount_options(opts, dev, mp)

    # -- files (paths inside the guest; symlinks resolve inside the guest) ---------------
    def exists(self, path: str) -> bool:
        return bool(self.g.exists(path))

    def is_symlink(self, path: str) -> bool:
        return bool(self.g.is_symlink(path))

    def read(self, path: str, limit: int = MAX_CONFIG, *, step: str = "read") -> bytes:
        """The bytes of a regular file, refused past `limit` bytes."""
        if not self.g.is_file(path, followsymlinks=True):
            raise GuestError(step, f"{path} in the guest is not a regular file")
        size = self.g.filesize(path)
        if size > limit:
            raise GuestError(
                step, f"{path} in the guest is {size} bytes (more than {limit}): refusing it"
            )
        return bytes(self.g.read_file(path))[:limit]

    def read_text(self, path: str, limit: int = MAX_CONFIG, *, step: str = "read") -> str:
        """A configuration file as text; a binary one (NUL bytes, not UTF-8) is refused."""
        data = self.read(path, limit, step=step)
        if b"\0" in data:
            raise GuestError(step, f"{path} in the guest is binary, not a configuration file")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("latin-1")

    def write_text(self, path: str, text: str, *, step: str = "write") -> None:
        """Replace a file's content (never through a symlink: it could name anything)."""
        if self.g.is_symlink(path):
            raise GuestError(
                step,
                f"{path} in the guest is a symlink (to {self.g.readlink(path)}): not editing it",
            )
        self.g.write(path, text.encode())

    def listdir(self, path: str, limit: int = 4096) -> list[str]:
        """Names in a guest directory (none when it is absent), at most `limit`."""
        if not self.g.is_dir(path, followsymlinks=True):
            return []
        names = sorted(self.g.ls(path))
        if len(names) > limit:
            raise GuestError("inspect", f"{path} in the guest holds {len(names)} entries")
        return names

    # -- commands inside the guest's root -------------------------------------------------
    def run(self, argv: Sequence[str], *, step: str, label: str | None = None) -> str:
        """Run a guest program in the guest's root (the appliance binds /dev, /proc, /sys
        there) and return its output; failure is a GuestError naming `step`."""
        # the output goes to stderr too on failure: libguestfs puts stderr in the error
        script = (
            "export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C DEBIAN_FRONTEND=noninteractive; "
            'out=$("$@" 2>&1); rc=$?; printf "%s\\n" "$out"; '
            '[ $rc = 0 ] || { printf "%s\\n" "$out" | tail -n 5 >&2; exit $rc; }'
        )
        try:
            return str(self.g.command(["/bin/sh", "-c", script, "sh", *argv]))
        except RuntimeError as exc:
            last = str(exc).strip().splitlines()[-3:]
            raise GuestError(step, f"{label or ' '.join(argv)} failed: {' | '.join(last)}") from exc
