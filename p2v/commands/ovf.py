"""`p2v ovf pack|unpack`: OVA appliances. The work is formats.ovf's."""

from __future__ import annotations

import argparse
import os

from drivers.names import OS_FAMILIES
from p2v.output import human_size, parse_size, print_json
from p2v.progress import byte_bar


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ovf", help="pack disks into an OVA, or verify and unpack one")
    ovf_sub = p.add_subparsers(dest="ovf_command", metavar="ACTION", required=True)

    pk = ovf_sub.add_parser(
        "pack",
        help="convert disks to streamOptimized VMDK and archive them as an OVA",
        description=(
            "Convert each DISK to a streamOptimized VMDK and write OUT.ova: descriptor first, "
            "then the manifest, then the disks (USTAR). Written as OUT.ova.partial and "
            "renamed on success."
        ),
    )
    pk.add_argument("-o", dest="output", required=True, metavar="OUT.ova")
    pk.add_argument("--name", help="VM name (default: OUT's name)")
    pk.add_argument("--cpus", type=int, default=1)
    pk.add_argument("--memory", type=parse_size, default=1 << 30, help="e.g. 2G (default 1G)")
    pk.add_argument("--firmware", choices=("bios", "efi", "uefi"), default="bios")
    pk.add_argument("--os", choices=OS_FAMILIES, help="guest OS family")
    pk.add_argument("--ovf-version", choices=("1", "2"), default="1")
    pk.add_argument("--manifest", choices=("sha256", "sha1"), default="sha256")
    pk.add_argument("--flavor", choices=("vmware", "virtualbox"), default="vmware",
                    help="controller and network names for this importer")  # fmt: skip
    pk.add_argument("-f", dest="fmt", help="format of the disks (probed if omitted)")
    pk.add_argument("--force", action="store_true", help="overwrite OUT")
    pk.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
    pk.add_argument("-W", "--workers", type=int)
    pk.add_argument("--output", dest="print_as", choices=("human", "json"), default="human")
    pk.add_argument("disks", nargs="+", metavar="DISK")
    pk.set_defaults(func=cmd_pack)

    up = ovf_sub.add_parser(
        "unpack",
        help="verify an .ova/.ovf and extract (and convert) its disks",
        description=(
            "Check the archive's members and the manifest's digests, extract the disks into "
            "DIR (converted to -O FMT when given) and print the machine description."
        ),
    )
    up.add_argument("-O", dest="out_fmt", help="convert the disks to this format")
    up.add_argument("--force", action="store_true", help="overwrite files in DIR")
    up.add_argument("-p", dest="progress", action="store_true")
    up.add_argument("-W", "--workers", type=int)
    up.add_argument("--output", dest="print_as", choices=("human", "json"), default="human")
    up.add_argument("source", metavar="OVA_OR_OVF")
    up.add_argument("outdir", metavar="DIR")
    up.set_defaults(func=cmd_unpack)


def cmd_pack(args: argparse.Namespace) -> int:
    stem = os.path.splitext(os.path.basename(args.output))[0]
    machine = {
        "name": args.name or stem,
        "cpus": args.cpus,
        "memory": args.memory,
        "firmware": "uefi" if args.firmware in ("efi", "uefi") else "bios",
        "secure_boot": False,
        "os": args.os,
        "disks": [{"bus": "scsi"} for _ in args.disks],
        "nics": [{"mac": None, "model": "e1000", "network": None}],
    }
    if not 1 <= args.cpus <= 768:
        raise ValueError(f"--cpus {args.cpus} is absurd (1..768)")
    if not 4 << 20 <= args.memory <= 24 << 40:
        raise ValueError(f"--memory {args.memory} bytes is absurd (4 MiB..24 TiB)")
    with byte_bar("pack", args.progress) as progress:
        from formats import ovf

        result = ovf.pack(
            args.disks,
            args.output,
            machine,
            ovf_version=args.ovf_version,
            digest=args.manifest,
            flavor=args.flavor,
            source_format=args.fmt,
            force=args.force,
            progress=progress,
            workers=args.workers,
        )
    if args.print_as == "json":
        print_json(result)
        return 0
    print(
        f"{result.output}: OVF {result.ovf_version}, {human_size(result.size)}, {result.manifest} manifest"
    )
    for d in result.disks:
        print(
            f"  {d.name}: {human_size(d.virtual_size)} virtual, {human_size(d.file_size)} in the archive"
        )
    return 0


def cmd_unpack(args: argparse.Namespace) -> int:
    with byte_bar("unpack", args.progress) as progress:
        from formats import ovf

        result = ovf.unpack(
            args.source,
            args.outdir,
            out_format=args.out_fmt,
            force=args.force,
            progress=progress,
            workers=args.workers,
        )
    if args.print_as == "json":
        print_json(result)
        return 0
    m = result.machine
    print(
        f"{result.source}: OVF {result.ovf_version}, manifest {result.manifest or 'absent (not verified)'}"
    )
    print(f"machine {m['name']}: {m['cpus']} CPU(s), {human_size(m['memory'])}, {m['firmware']}"
          f"{', Secure Boot' if m.get('secure_boot') else ''}, OS {m.get('os') or 'unknown'}")  # fmt: skip
    for d in result.disks:
        print(f"  disk {d.name} -> {d.output} ({d.format}, {human_size(d.virtual_size)})")
    for n in m.get("nics") or []:
        print(
            f"  NIC {n.get('mac') or '(no MAC)'} {n.get('model') or ''} on {n.get('network') or '?'}"
        )
    for w in result.warnings:
        print(f"  ! {w}")
    return 0
