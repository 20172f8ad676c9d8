"""Partition commands: `p2v partitions` (like `sfdisk --list`, with the filesystem found
in each partition) and `p2v resize` (like `qemu-img resize`, keeping a GPT valid)."""

from __future__ import annotations

import argparse

import formats
from p2v.output import human_size, parse_size, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "partitions",
        help="list an image's partitions and the filesystems inside them",
        description=(
            "Show the partition table (GPT or MBR, with logical partitions numbered from 5 "
            "as Linux numbers them): offsets and sizes in bytes, types, names, and the "
            "filesystem found in each partition."
        ),
    )
    p.add_argument("-f", "--format", dest="fmt", help="image format (probed if omitted)")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("image")
    p.set_defaults(func=cmd_partitions)

    p = sub.add_parser(
        "resize",
        help="grow or shrink an image (a GPT's backup moves to the new end)",
        description=(
            "Set IMAGE's virtual size to SIZE, or change it by +SIZE / -SIZE (suffixes K, M, "
            "G, T as qemu-img). Shrinking needs --shrink and is refused below the end of the "
            "last partition. A negative size may follow `--`. raw and qcow2 are resized in "
            "place; vmdk, vpc, vhdx and vdi are rewritten to IMAGE.partial with the same "
            "subformat and options (and parent) and renamed over IMAGE, so the free space "
            "needed is the image's allocated size. A VHD sized by CHS geometry grows to the "
            "next CHS capacity (as qemu-img create does; force_size images get SIZE exactly); "
            "streamOptimized VMDKs round up to 64 KiB."
        ),
    )
    p.add_argument("-f", "--format", dest="fmt", help="image format (probed if omitted)")
    p.add_argument("--shrink", action="store_true", help="allow making the image smaller")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("image")
    # REMAINDER so that "-10G" is taken as the size, not as an option
    p.add_argument("size", nargs=argparse.REMAINDER, metavar="[+|-]SIZE")
    p.set_defaults(func=cmd_resize)


def cmd_partitions(args: argparse.Namespace) -> int:
    from formats import disk  # loaded when used: `p2v` starts sooner

    with formats.open(args.image, args.fmt) as img:
        layout = disk.describe(img)
    if args.output == "json":
        print_json(layout)
        return 0
    print(
        f"Disk {layout.filename}: {human_size(layout.size)}, {layout.size} bytes, {layout.format}"
    )
    if layout.label is None:
        fs = layout.filesystem or "unknown"
        print(f"No partition table; content: {fs}")
        return 0
    print(f"Partition table: {layout.label}, id {layout.id}, sector size {layout.sector_size}")
    for w in layout.warnings:
        print(f"Warning: {w}")
    if not layout.partitions:
        print("No partitions.")
        return 0
    rows = [("#", "Start", "End", "Size", "Type", "Name", "Filesystem")]
    for e in layout.partitions:
        rows.append(
            (
                f"{e.number}{'*' if e.bootable else ''}",
                str(e.start),
                str(e.end - 1),
                human_size(e.size),
                f"{e.type_name} ({e.type})" if len(e.type) <= 2 else e.type_name,
                e.name or "",
                "(extended)" if e.container else e.filesystem or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def new_size(text: str, current: int) -> int:
    """SIZE, +SIZE or -SIZE against the current size."""
    text = text.strip()
    if text[:1] in "+-":
        delta = parse_size(text[1:])
        return current + delta if text[0] == "+" else current - delta
    return parse_size(text)


def cmd_resize(args: argparse.Namespace) -> int:
    words = [w for w in args.size if w != "--"]
    if len(words) != 1:
        raise formats.FormatError("resize: give exactly one SIZE, +SIZE or -SIZE")
    with formats.open(args.image, args.fmt) as img:
        current = img.size
    size = new_size(words[0], current)
    if size < 0:
        raise formats.FormatError(f"resize: {words[0]} would make the size negative")
    from formats.resize import resize

    res = resize(args.image, size, args.fmt, shrink=args.shrink)
    if args.output == "json":
        print_json(res)
    elif res.new_size != size:
        print(f"Image resized to {res.new_size} bytes ({res.format} rounds {size} up).")
    else:
        print("Image resized.")
    return 0
