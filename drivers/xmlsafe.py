"""Parsing VM definitions that come from elsewhere: XML through defusedxml only, with
DTDs, entities and external references refused and the size capped."""

from __future__ import annotations

from xml.etree import ElementTree as ET

import defusedxml
import defusedxml.ElementTree as DET

from .errors import DriverError

MAX_DEFINITION = 4 << 20


def parse(data: bytes, where: str) -> ET.Element:
    if len(data) > MAX_DEFINITION:
        raise DriverError(f"{where}: {len(data)} bytes is too large for a VM definition")
    try:
        return DET.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except defusedxml.DefusedXmlException as exc:
        raise DriverError(f"{where}: XML refused ({exc})") from exc
    except ET.ParseError as exc:
        raise DriverError(f"{where}: malformed XML: {exc}") from exc


def read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_DEFINITION + 1)
    except OSError as exc:
        raise DriverError(f"{path}: {exc.strerror}") from exc
    if len(data) > MAX_DEFINITION:
        raise DriverError(f"{path}: too large for a VM definition")
    return data
