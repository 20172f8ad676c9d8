"""`p2v v2v`: move a VM (or a bare disk) to another hypervisor. The work is p2v.v2v's."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import drivers
from drivers.names import BUSES, NIC_MODELS, OS_FAMILIES
from p2v.output import human_size, parse_size, print_json
from p2v.progress import byte_bar

if TYPE_CHECKING:
    from drivers.guest.lxc import ContainerResult
    from p2v.v2v import V2VResult


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "v2v",
        help="convert a VM (.vmx, .ovf/.ova, libvirt XML, xl.cfg, bare disk) for another hypervisor",
        description=(
            "Convert every disk of SOURCE to the target platform's preferred format, write "
            "the target's VM definition into OUTDIR, and print what changed (disk bus, NIC "
            "model, firmware) and what the guest needs before its first boot there. "
            f"Platforms: {', '.join(drivers.NAMES)}; or lxc: the guest as an LXC container "
            "(rootfs tarball and configuration; --network names the bridge, default lxcbr0)."
        ),
    )
    p.add_argument("--to", dest="platform", default="kvm", metavar="PLATFORM",
                   help=f"target platform (default kvm; one of {', '.join(drivers.NAMES)}, lxc)")  # fmt: skip
    p.add_argument("-O", dest="out_fmt", help="disk format (default: the platform's preferred)")
    p.add_argument("-f", dest="src_fmt", help="format of a bare-disk SOURCE (probed if omitted)")
    p.add_argument("--name", help="VM name (default: the source's)")
    p.add_argument("--cpus", type=int, help="number of virtual CPUs")
    p.add_argument("--memory", type=parse_size, help="memory, e.g. 4G")
    p.add_argument("--firmware", choices=("bios", "uefi", "efi"))
    p.add_argument("--os", choices=OS_FAMILIES, help="guest OS family (guides bus and NIC choices)")
    p.add_argument("--bus", choices=BUSES, help="disk bus for every disk")
    p.add_argument("--nic-model", choices=NIC_MODELS, help="NIC model for every NIC")
    p.add_argument("--network", help="network, bridge or switch every NIC joins")
    p.add_argument("--force", action="store_true", help="overwrite existing disks in OUTDIR")
    p.add_argument("--no-convert-guest", action="store_true",
                   help="leave the guest as copied (no drivers, fstab, network changes)")  # fmt: skip
    p.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
    p.add_argument("-W", "--workers", type=int, help="conversion worker threads")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("outdir", metavar="OUTDIR")
    p.set_defaults(func=cmd_v2v)


def cmd_v2v(args: argparse.Namespace) -> int:
    from p2v.v2v import V2VRequest, run_v2v  # conversion machinery: only when used

    req = V2VRequest(
        source=args.source,
        outdir=args.outdir,
        platform=args.platform,
        out_format=args.out_fmt,
        source_format=args.src_fmt,
        name=args.name,
        cpus=args.cpus,
        memory=args.memory,
        firmware="uefi" if args.firmware == "efi" else args.firmware,
        os=args.os,
        bus=args.bus,
        nic_model=args.nic_model,
        network=args.network,
        force=args.force,
        workers=args.workers,
        convert_guest=not args.no_convert_guest,
    )
    if args.platform == "lxc":
        from p2v.v2v import run_v2lxc

        container = run_v2lxc(req)
        if args.output == "json":
            print_json(container)
        else:
            print_container(container)
        return 0
    with byte_bar("v2v", args.progress) as progress:
        result = run_v2v(req, progress)
    if args.output == "json":
        print_json(result)
    else:
        print_summary(result)
    return 0


def print_summary(r: V2VResult) -> None:
    platform = drivers.get_platform(r.platform)
    print(f"{r.source} ({r.source_kind}) -> {platform.title} in {r.outdir}")
    for i, d in enumerate(r.disks, 1):
        print(
            f"  disk {i}: {d.source} ({d.source_format}) -> {d.output} "
            f"({d.format}, {human_size(d.virtual_size)}, {d.seconds:.1f} s)"
        )
    print(f"definition: {r.definition}")
    if r.changes:
        print("what changed:")
        for line in r.changes:
            print(f"  - {line}")
    if r.checklist:
        print("before the first boot on the new platform:")
        for line in r.checklist:
            print(f"  [ ] {line}")
    if r.warnings:
        print("not carried over / warnings:")
        for line in r.warnings:
            print(f"  ! {line}")
    if r.conversion is not None:
        from p2v.commands.guest import print_conversion

        print_conversion(r.conversion)


def print_container(r: ContainerResult) -> None:
    print(f"{', '.join(r.images)} -> LXC container {r.name} ({r.distribution} {r.version})")
    print(f"rootfs: {r.rootfs} (without {', '.join(r.excluded)})")
    print(f"config: {r.config} ({r.cpus} CPU(s), {r.memory >> 20} MiB, veth on {r.bridge}, "
          f"cgroup {r.cgroup} keys)")  # fmt: skip
    for c in r.changes:
        print(f"  - {c.target}: {'; '.join(c.details)}")
    for w in r.warnings:
        print(f"  ! {w}")
    print("to run it:")
    for step in r.next_steps:
        print(f"  {step}")
