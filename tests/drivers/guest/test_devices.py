"""devices.py: bus-dependent device names -> UUID= in fstab, crypttab, root=, resume=."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from drivers.guest import bootloader, devices

UUIDS = {"/dev/sda1": "UUID=1111", "/dev/sda2": "UUID=2222", "/dev/sdb1": "UUID=3333"}


def remap(name: str) -> str | None:
    return UUIDS.get(name)


def test_disk_position_of_every_bus():
    assert devices.disk_position("/dev/sda1") == (0, 1)
    assert devices.disk_position("/dev/vdb") == (1, None)
    assert devices.disk_position("/dev/xvdc3") == (2, 3)
    assert devices.disk_position("/dev/hdaa2") == (26, 2)
    assert devices.disk_position("/dev/nvme1n1p2") == (1, 2)
    for kept in (
        "/dev/mapper/vg-root",
        "/dev/vg/root",
        "UUID=x",
        "/dev/disk/by-uuid/x",
        "/dev/md0",
    ):
        assert devices.disk_position(kept) is None


def test_appliance_name_inverts_disk_position():
    for name in ("/dev/sda", "/dev/sdz9", "/dev/sdaa1", "/dev/sdbz12"):
        assert devices.appliance_name(*devices.disk_position(name)) == name


def test_fstab_devices_remapped_everything_else_kept():
    fstab = (
        "# /etc/fstab: static file system information.\n"
        "/dev/sda1  /  ext4  errors=remount-ro 0 1\n"
        "\n"
        "/dev/mapper/vg-home /home ext4 defaults 0 2\n"
        "\t/dev/sda2\tnone\tswap\tsw\t0\t0\n"
        "/dev/sdc1 /data xfs defaults 0 0\n"
        "proc /proc proc defaults 0 0"
    )
    new, changes = devices.remap_table(fstab, 0, remap)
    assert new.splitlines()[1] == "UUID=1111  /  ext4  errors=remount-ro 0 1"
    assert new.splitlines()[4] == "\tUUID=2222\tnone\tswap\tsw\t0\t0"
    # no filesystem known behind sdc1: left as it is
    assert "/dev/sdc1 /data" in new
    assert new.endswith("proc /proc proc defaults 0 0")
    assert changes == ["/dev/sda1 -> UUID=1111", "/dev/sda2 -> UUID=2222"]


def test_crypttab_source_column():
    text = "cryptroot /dev/sda2 none luks,discard\n"
    new, _ = devices.remap_table(text, 1, remap)
    assert new == "cryptroot UUID=2222 none luks,discard\n"


lines = st.lists(
    st.one_of(
        st.sampled_from(["/dev/sda1", "/dev/sda2", "/dev/sdb1", "/dev/sdz7", "LABEL=x", "#c", ""]),
        st.text(alphabet="abc/=# \t", max_size=12),
    ).flatmap(
        lambda dev: st.tuples(
            st.just(dev), st.sampled_from([" ", "\t", "  "]), st.text(alphabet="abc/ ", max_size=10)
        )
    ),
    max_size=12,
)


@given(lines)
def test_fstab_rewrite_touches_only_known_device_fields(rows):
    text = "".join(f"{d}{sep}{rest}\n" for d, sep, rest in rows)
    new, changes = devices.remap_table(text, 0, remap)
    assert len(new.splitlines()) == len(text.splitlines())
    for old_line, new_line in zip(text.splitlines(), new.splitlines()):
        first = old_line.split()[0] if old_line.split() else ""
        if first in UUIDS and not old_line.lstrip().startswith("#"):
            assert new_line == old_line.replace(first, UUIDS[first], 1)
        else:
            assert new_line == old_line
    assert len(changes) == sum(1 for a, b in zip(text.splitlines(), new.splitlines()) if a != b)


def test_grub_defaults_uuid_switch_and_command_line():
    text = (
        'GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX_DEFAULT="quiet"\n'
        'GRUB_CMDLINE_LINUX="root=/dev/sda1 resume=/dev/sda2 console=ttyS0"\n'
        "GRUB_DISABLE_LINUX_UUID=true\n"
    )
    new, changes = bootloader.set_grub_defaults(text, remap)
    assert 'GRUB_CMDLINE_LINUX="root=UUID=1111 resume=UUID=2222 console=ttyS0"' in new
    assert "GRUB_DISABLE_LINUX_UUID=false\n" in new
    assert "GRUB_DEFAULT=0\n" in new and len(changes) == 3


@given(st.text(alphabet="abcroteum=/dsv1 \"'\n", max_size=80))
def test_kernel_args_rewrite_changes_only_root_and_resume(text):
    new, changes = devices.remap_kernel_args(text, remap)
    if not changes:
        assert new == text
    for a in ("root=/dev/sda1", "resume=/dev/sda1"):
        assert new.count(a) <= text.count(a)


def test_initramfs_tools_resume():
    new, changes = devices.remap_assignment("RESUME=/dev/sda2\n", "RESUME", remap)
    assert new == "RESUME=UUID=2222\n" and changes
