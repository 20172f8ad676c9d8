"""What the boot tests share: a built server or a skip with the reason (a failure under
CI, where `make test` installs everything), the accelerator, and the timeouts."""

from __future__ import annotations

import os

import pytest

from tests.external import IN_CI, need_root, need_tool
from tests.guests import servers

#: a full Debian boot under TCG on a loaded 2-core machine takes minutes, never 15
BOOT_TIMEOUT = 900.0


def server(name: str) -> servers.Server:
    """Server `name`, built (once, cached) for this test session."""
    need_root()
    need_tool("mmdebstrap", "qemu-system-x86_64", "qemu-img", "virsh")
    missing = servers.missing_tools()
    if missing:
        msg = f"missing for the test servers: {', '.join(missing)} (make test installs them)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    if not os.path.exists("/boot") or not any(n.startswith("vmlinuz") for n in os.listdir("/boot")):
        # supermin builds the libguestfs appliance from the host's kernel
        msg = "no kernel in /boot for the libguestfs appliance (Debian package linux-image-amd64)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return servers.build(name)


def accel() -> str:
    return servers.accelerator()
