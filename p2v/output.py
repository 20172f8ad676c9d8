"""Printing results: human text or JSON from the dataclass a library call returned."""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
from typing import Any


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name.replace("_", "-"): to_jsonable(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if getattr(obj, f.name) is not None  # qemu-img omits absent keys
        }
    if isinstance(obj, enum.Enum):
        return obj.name.lower() if isinstance(obj.value, int) else obj.value
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


def print_json(obj: Any) -> None:
    json.dump(to_jsonable(obj), sys.stdout, indent=4)
    sys.stdout.write("\n")


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def parse_size(text: str) -> int:
    """Parse '10G', '512M', '1.5T', '4096' (qemu-img's suffixes, powers of 1024)."""
    units = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
    t = text.strip().lower()
    for suffix in ("ib", "b"):
        if len(t) > 1 and t.endswith(suffix) and t[-len(suffix) - 1].isalpha():
            t = t[: -len(suffix)]
            break
    num, unit = (t[:-1], t[-1]) if t and t[-1].isalpha() else (t, "")
    if unit not in units:
        raise ValueError(f"invalid size {text!r}")
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"invalid size {text!r}") from None
    if value < 0:
        raise ValueError(f"invalid size {text!r}: negative")
    return int(value * units[unit])
