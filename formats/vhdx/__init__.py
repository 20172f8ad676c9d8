"""VHDX (Hyper-V's format, [MS-VHDX]): declarations in layout.py, the metadata log in
log.py, the image and its creation in image.py."""

from ..magic import vhdx as matches
from .image import FORMAT, VhdxImage, create, open_image

__all__ = ["FORMAT", "VhdxImage", "create", "matches", "open_image"]
