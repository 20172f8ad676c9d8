"""Converting on overlays: the guest is edited in qcow2 overlays over the images
(`qemu-img create -b IMAGE`), and the overlays are written back only when the whole
conversion succeeded, so a failed conversion leaves the images as they were.

Writing back is `qemu-img commit` (only the overlay's clusters move) for every format
QEMU writes in place; a streamOptimized VMDK, which can only be written front to back,
is written again whole from the overlay by p2v's own engine."""

from __future__ import annotations

import json
import os
import subprocess

import formats
from formats.convert import convert

from .errors import GuestError


def _qemu_img(*args: str, step: str) -> str:
    try:
        res = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise GuestError(step, "qemu-img is not installed (Debian: qemu-utils)") from exc
    if res.returncode != 0:
        raise GuestError(step, f"qemu-img {args[0]} failed: {res.stderr.strip().splitlines()[-1:]}")
    return res.stdout


def image_format(path: str, fmt: str | None) -> str:
    """The image's format as qemu names it (p2v's probe: it knows a fixed VHD)."""
    try:
        return formats.normalize_format(fmt) if fmt else formats.probe(path)
    except (formats.FormatError, OSError) as exc:
        raise GuestError("open", f"{path}: {exc}") from exc


def create(image: str, fmt: str, directory: str) -> str:
    path = os.path.join(
        directory, f"{len(os.listdir(directory))}-{os.path.basename(image)}.overlay.qcow2"
    )
    _qemu_img(
        "create", "-q", "-f", "qcow2", "-b", os.path.abspath(image), "-F", fmt, path, step="overlay"
    )
    return path


def _stream_optimized(image: str) -> bool:
    info = json.loads(_qemu_img("info", "--output=json", "-f", "vmdk", image, step="commit"))
    data = (info.get("format-specific") or {}).get("data") or {}
    return data.get("create-type") == "streamOptimized"


def commit(overlay: str, image: str, fmt: str) -> None:
    """Write the overlay's changes into `image`."""
    if fmt == "vmdk" and _stream_optimized(image):
        with formats.open(
            overlay, "qcow2", backing_dirs=(os.path.dirname(os.path.abspath(image)),)
        ) as src:
            convert(
                src, image, "vmdk", options={"subformat": "streamOptimized"}, force=True, sources=()
            )
        return
    _qemu_img("commit", "-q", "-f", "qcow2", overlay, step="commit")
