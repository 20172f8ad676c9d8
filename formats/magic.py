"""The bytes each format announces itself with, and the rule that names a file's format.

Kept apart from the format modules (and free of their imports) so that probing a file
loads only the module of the format it finds: `p2v convert` starts that much sooner.
"""

from __future__ import annotations

QCOW2_MAGIC = b"QFI\xfb"
VMDK_SPARSE_MAGIC = b"KDMV"  # 0x564d444b little-endian
VMDK_COWD_MAGIC = b"COWD"
VHDX_SIGNATURE = b"vhdxfile"
VHD_COOKIE = b"conectix"
VDI_SIGNATURE = 0xBEDA107F

#: bytes read from each end of a file to probe it
HEAD = 4096
TAIL = 512


def qcow2(head: bytes, tail: bytes) -> bool:
    return head[:4] == QCOW2_MAGIC and int.from_bytes(head[4:8], "big") in (2, 3)


def vmdk(head: bytes, tail: bytes) -> bool:
    if head[:4] in (VMDK_SPARSE_MAGIC, VMDK_COWD_MAGIC):
        return True
    # a descriptor file: after comments and blank lines, "version=1|2|3" (qemu's rule);
    # VMware's and qemu's start with the comment "# Disk DescriptorFile"
    text = head.removeprefix(b"\xef\xbb\xbf")
    for line in text.split(b"\n")[:64]:
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        return line in (b"version=1", b"version=2", b"version=3")
    return False


def vhdx(head: bytes, tail: bytes) -> bool:
    return head[:8] == VHDX_SIGNATURE


def vdi(head: bytes, tail: bytes) -> bool:
    return len(head) >= 72 and int.from_bytes(head[64:68], "little") == VDI_SIGNATURE


def vpc(head: bytes, tail: bytes) -> bool:
    # a fixed VHD has its only footer at the end: qemu probes it as raw, we do not
    return VHD_COOKIE in (head[:8], tail[:8], tail[1:9])


#: probe order (qemu-img's names); raw is what matches none of them
RULES = {"qcow2": qcow2, "vmdk": vmdk, "vhdx": vhdx, "vdi": vdi, "vpc": vpc}


def identify(head: bytes, tail: bytes) -> str:
    for fmt, rule in RULES.items():
        if rule(head, tail):
            return fmt
    return "raw"
