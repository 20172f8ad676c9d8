"""Backing-file resolution: relative to the child, confined, acyclic, bounded in depth.

qemu follows any path a qcow2 header names; a hostile image can point at /etc/shadow or
at itself. We resolve relative to the child image, refuse paths that leave the allowed
directories, refuse cycles, and cap the chain depth.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .errors import UnsafeImage

if TYPE_CHECKING:
    from .image import Image

MAX_CHAIN_DEPTH = 64


@dataclass(frozen=True)
class BackingPolicy:
    allow: bool = True
    #: directories a backing file may live in; None means the top image's directory
    dirs: tuple[str, ...] | None = None
    #: real paths of the images above, for cycle detection
    chain: tuple[str, ...] = ()

    def descend(self, path: str) -> BackingPolicy:
        real = os.path.realpath(path)
        dirs = self.dirs if self.dirs is not None else (os.path.dirname(real),)
        return replace(self, dirs=dirs, chain=(*self.chain, real))


def resolve(child_path: str, name: str, policy: BackingPolicy) -> str:
    """Return the real path of backing file `name` named by `child_path`, or raise UnsafeImage."""
    if not policy.allow:
        raise UnsafeImage(f"{child_path}: has backing file {name!r} but backing files are disabled")
    if "\0" in name or not name:
        raise UnsafeImage(f"{child_path}: invalid backing file name {name!r}")
    base = os.path.dirname(os.path.abspath(child_path))
    real = os.path.realpath(os.path.join(base, name))
    dirs = policy.dirs or (os.path.dirname(os.path.realpath(child_path)),)
    if not any(real == d or real.startswith(d.rstrip(os.sep) + os.sep) for d in dirs):
        raise UnsafeImage(
            f"{child_path}: backing file {name!r} resolves to {real}, outside the allowed "
            f"directories ({', '.join(dirs)}); allow it with --backing-dir"
        )
    if real in policy.chain or real == os.path.realpath(child_path):
        raise UnsafeImage(f"{child_path}: backing chain has a cycle through {real}")
    if len(policy.chain) >= MAX_CHAIN_DEPTH:
        raise UnsafeImage(f"{child_path}: backing chain deeper than {MAX_CHAIN_DEPTH}")
    return real


def open_backing(child_path: str, name: str, fmt: str | None, policy: BackingPolicy) -> Image:
    from . import open_image

    path = resolve(child_path, name, policy)
    if not os.path.exists(path):
        raise UnsafeImage(f"{child_path}: backing file {name!r} not found ({path})")
    return open_image(path, fmt, policy=policy.descend(child_path))
