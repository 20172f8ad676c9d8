"""Creation options (`-o key=value,...`): values arrive as strings from the CLI or as
typed values from Python; formats parse them with these functions."""

from __future__ import annotations

from .errors import FormatError

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}


def parse_size(value: int | str, what: str = "size") -> int:
    """'64k', '2M', '1.5G', 4096 -> bytes (powers of 1024, as qemu-img)."""
    if isinstance(value, int):
        n = value
    else:
        t = value.strip().lower().removesuffix("ib").removesuffix("b") or "0"
        unit = t[-1] if t[-1].isalpha() else ""
        if unit not in _UNITS:
            raise FormatError(f"invalid {what} {value!r}")
        try:
            n = int(float(t[: len(t) - len(unit)]) * _UNITS[unit])
        except ValueError:
            raise FormatError(f"invalid {what} {value!r}") from None
    if n < 0:
        raise FormatError(f"invalid {what} {value!r}: negative")
    return n


def parse_bool(value: bool | str, what: str) -> bool:
    if isinstance(value, bool):
        return value
    t = str(value).strip().lower()
    if t in ("on", "yes", "true", "1"):
        return True
    if t in ("off", "no", "false", "0"):
        return False
    raise FormatError(f"invalid value {value!r} for {what} (on or off)")


def parse_choice(value: str, what: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise FormatError(f"invalid {what} {value!r} (one of: {', '.join(choices)})")
    return value


def parse_option_string(text: str) -> dict[str, str]:
    """'a=1,b=two' -> {'a': '1', 'b': 'two'}; qemu's ',,' escapes a comma in a value."""
    out: dict[str, str] = {}
    if not text:
        return out
    parts: list[str] = []
    cur = ""
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    parts.append(cur)
    for part in parts:
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise FormatError(f"invalid option {part!r} (expected key=value)")
        out[key.strip().replace("-", "_")] = value
    return out
