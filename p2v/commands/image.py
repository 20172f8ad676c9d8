"""Image commands, spelled like qemu-img's: info, convert, check, compare, map, create."""

from __future__ import annotations

import argparse
import os

from formats.options import parse_option_string
from p2v import images
from p2v.output import human_size, parse_size, print_json
from p2v.progress import byte_bar


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="describe an image (or an .ova/.ovf appliance)",
        description="Show an image's format, sizes, backing file and format specifics.",
    )
    p.add_argument("-f", "--format", dest="fmt", help="image format (probed if omitted)")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("--backing-chain", action="store_true", help="describe every backing image")
    p.add_argument("--backing-dir", action="append", help="allow backing files in DIR")
    p.add_argument("image")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "convert",
        help="convert an image to another format",
        description=(
            "Convert SRC into a new image DST of format -O. Zero and unallocated ranges are "
            "never written; compression runs on all cores. DST is written as DST.partial "
            "and renamed on success."
        ),
    )
    p.add_argument("-f", "--format", dest="fmt", help="source format (probed if omitted)")
    p.add_argument("-O", dest="out_fmt", required=True, help="output format")
    p.add_argument("-o", dest="options", action="append", default=[], help="k=v,... options")
    p.add_argument("-c", dest="compress", action="store_true", help="compress the output")
    p.add_argument("-B", dest="backing", help="write an overlay on this backing image")
    p.add_argument("-F", dest="backing_fmt", help="format of the backing image")
    p.add_argument("--backing-dir", action="append", help="allow backing files in DIR")
    p.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
    # qemu-img's spelling: -W allows out-of-order writes, -m N sets the requests in flight
    p.add_argument(
        "-W",
        dest="out_of_order",
        action="store_true",
        help="accepted for qemu-img: p2v writes out of order wherever the output allows",
    )
    p.add_argument(
        "-m",
        dest="workers",
        type=_requests,
        metavar="N",
        help="parallel requests, 1-16 as in qemu-img (default: cores + 1 when compressing, else 1)",
    )
    p.add_argument("--workers", type=_positive, metavar="N", help="parallel requests, any number")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument(
        "-t",
        dest="cache",
        choices=("writeback", "unsafe"),
        default="writeback",
        help="writeback (default): DST is fsynced before the rename, durable when p2v exits; "
        "unsafe: leave the data to the kernel's writeback, as qemu-img convert does by default",
    )
    p.add_argument("--partition", type=int, metavar="N", help="convert only partition N")
    p.add_argument(
        "--wrap-partition",
        action="store_true",
        help="SRC is a partition image: make a whole disk holding it",
    )
    p.add_argument("--table", choices=("gpt", "mbr"), default="gpt", help="with --wrap-partition")
    p.add_argument(
        "--skip-unused",
        action="store_true",
        help="copy only blocks the filesystems use (like partclone)",
    )
    # blocks are shared with the source wherever the filesystem can (formats/transfer.py)
    p.add_argument(
        "--no-share",
        dest="share",
        action="store_false",
        help="copy every byte, even where the output could share the source's blocks",
    )
    p.add_argument(
        "-C", dest="copy_offload", action="store_true", help="accepted for qemu-img: the default"
    )
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "check",
        help="check an image's metadata",
        description="Exit status as qemu-img: 0 clean, 2 corrupt, 3 leaks only, 63 not supported.",
    )
    p.add_argument("-f", "--format", dest="fmt")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("image")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "compare",
        help="compare two images' contents",
        description="Exit status 0 when identical, 1 when different (and where they first differ).",
    )
    p.add_argument("-f", dest="fmt_a", help="format of A")
    p.add_argument("-F", dest="fmt_b", help="format of B")
    p.add_argument("-s", "--strict", action="store_true", help="different sizes are a difference")
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("map", help="show which ranges hold data and which read as zeros")
    p.add_argument("-f", "--format", dest="fmt")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("image")
    p.set_defaults(func=cmd_map)

    p = sub.add_parser("create", help="create a new, empty image")
    p.add_argument("-f", "--format", dest="fmt", required=True)
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("-b", dest="backing", help="backing file (relative to IMAGE's directory)")
    p.add_argument("-F", dest="backing_fmt")
    p.add_argument("--force", action="store_true")
    p.add_argument("image")
    p.add_argument("size", nargs="?", help="e.g. 10G (taken from -b when omitted)")
    p.set_defaults(func=cmd_create)


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return n


def _requests(value: str) -> int:
    """-m as qemu-img bounds it: 1 to 16 coroutines."""
    n = _positive(value)
    if n > 16:
        raise argparse.ArgumentTypeError(f"parallel requests must be 1-16 (got {n})")
    return n


def _options(values: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        out.update(parse_option_string(v))
    return out


def _dirs(values: list[str] | None) -> tuple[str, ...] | None:
    return tuple(os.path.realpath(d) for d in values) if values else None


def cmd_info(args: argparse.Namespace) -> int:
    info = images.describe(
        args.image, args.fmt, backing_chain=args.backing_chain, backing_dirs=_dirs(args.backing_dir)
    )
    if args.output == "json":
        print_json(info)
        return 0
    if isinstance(info, dict):
        _print_tree(info, 0)
        return 0
    while info is not None:
        _print_info(info)
        info = info.backing_image
        if info is not None:
            print()
    return 0


def _print_info(info: images.ImageInfo) -> None:
    print(f"image: {info.filename}")
    print(f"file format: {info.format}")
    print(f"virtual size: {human_size(info.virtual_size)} ({info.virtual_size} bytes)")
    print(f"disk size: {human_size(info.actual_size)}")
    if info.cluster_size:
        print(f"cluster_size: {info.cluster_size}")
    if info.backing_filename:
        print(f"backing file: {info.backing_filename}")
    if info.backing_format:
        print(f"backing file format: {info.backing_format}")
    if info.format_specific:
        print("Format specific information:")
        _print_tree(info.format_specific["data"], 1)


def _print_tree(data: dict, depth: int) -> None:
    pad = "    " * depth
    for key, value in data.items():
        if isinstance(value, dict):
            print(f"{pad}{key}:")
            _print_tree(value, depth + 1)
        elif isinstance(value, list):
            print(f"{pad}{key}:")
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    print(f"{pad}    [{i}]:")
                    _print_tree(item, depth + 2)
                else:
                    print(f"{pad}    {item}")
        else:
            print(f"{pad}{key}: {str(value).lower() if isinstance(value, bool) else value}")


def cmd_convert(args: argparse.Namespace) -> int:
    req = images.ConvertRequest(
        source=args.src,
        output=args.dst,
        out_format=args.out_fmt,
        source_format=args.fmt,
        options=_options(args.options),
        compress=args.compress,
        backing_file=args.backing,
        backing_format=args.backing_fmt,
        backing_dirs=_dirs(args.backing_dir),
        force=args.force,
        durable=args.cache == "writeback",
        partition=args.partition,
        wrap_partition=args.wrap_partition,
        table=args.table,
        skip_unused=args.skip_unused,
        workers=args.workers,
        share=args.share,
    )
    with byte_bar("convert", args.progress) as progress:
        stats = images.run_convert(req, progress)
    if args.output == "json":
        print_json(stats)
    else:
        print(
            f"{human_size(stats.bytes_written)} of data: {human_size(stats.bytes_shared)} "
            f"shared, {human_size(stats.bytes_copied_in_kernel)} copied in the kernel, "
            f"{human_size(stats.bytes_copied)} copied"
        )
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    report = images.check(args.image, args.fmt)
    if args.output == "json":
        print_json(report)
        return report.exit_code
    if not report.checked:
        print(f"qemu-img-compatible check is not supported for format '{report.format}'")
        return report.exit_code
    for line in report.corruption_details:
        print(f"ERROR {line}")
    for line in report.leak_details:
        print(f"Leaked cluster: {line}")
    if report.corruptions:
        print(f"\n{report.corruptions} errors were found on the image.")
        print("Data may be corrupted, or further writes to the image may corrupt it.")
    if report.leaks:
        print(f"\n{report.leaks} leaked clusters were found on the image.")
        print("This means waste of disk space, but no harm to data.")
    if not report.corruptions and not report.leaks:
        print("No errors were found on the image.")
    return report.exit_code


def cmd_compare(args: argparse.Namespace) -> int:
    with byte_bar("compare", args.progress) as progress:
        res = images.compare(
            args.a, args.b, args.fmt_a, args.fmt_b, strict=args.strict, progress=progress
        )
    if args.output == "json":
        print_json(res)
    else:
        print(res.message)
    return 0 if res.identical else 1


def cmd_map(args: argparse.Namespace) -> int:
    entries = images.map_image(args.image, args.fmt)
    if args.output == "json":
        print_json(entries)
        return 0
    print(f"{'Offset':<20}{'Length':<20}Kind")
    for e in entries:
        print(f"{e.start:<#20x}{e.length:<#20x}{'data' if e.data else 'zero'}")
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    size = parse_size(args.size) if args.size is not None else None
    info = images.create(
        args.image,
        args.fmt,
        size,
        options=_options(args.options),
        backing_file=args.backing,
        backing_fmt=args.backing_fmt,
        force=args.force,
    )
    print(f"Formatting '{args.image}', fmt={info.format} size={info.virtual_size}")
    return 0
