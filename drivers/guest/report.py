"""The record of a conversion: every file changed (and how), every command run in the
guest (and its output's tail), warnings; written as conversion.json beside the outputs
and printed as a short summary."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

#: lines of a command's output kept in the report
OUTPUT_TAIL = 12


@dataclass
class Change:
    kind: str  # "file", "command", "package"
    target: str  # a path in the guest, a command line, a package name
    details: list[str] = field(default_factory=list)
    seconds: float | None = None


@dataclass
class Report:
    platform: str = ""
    changes: list[Change] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def file(self, path: str, details: list[str]) -> None:
        self.changes.append(Change("file", path, list(details)))

    def command(self, argv: list[str], output: str, seconds: float | None = None) -> None:
        tail = [line for line in output.strip().splitlines() if line.strip()][-OUTPUT_TAIL:]
        self.changes.append(Change("command", " ".join(argv), tail, seconds))

    def package(self, name: str, what: str) -> None:
        self.changes.append(Change("package", name, [what]))

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def summary(self) -> list[str]:
        """One line per change, as the command prints them at the end."""
        lines = []
        for c in self.changes:
            if c.kind == "file":
                lines.append(f"{c.target}: {'; '.join(c.details) or 'changed'}")
            elif c.kind == "command":
                took = f" ({c.seconds:.1f} s)" if c.seconds is not None else ""
                lines.append(f"ran {c.target}{took}")
            else:
                lines.append(f"package {c.target}: {'; '.join(c.details)}")
        return lines + [f"warning: {w}" for w in self.warnings]


def write_report(data: dict, directory: str, name: str = "conversion.json") -> str:
    """Write `data` (the conversion's dataclass as a dict) atomically into `directory`."""
    path = os.path.join(directory, name)
    tmp = f"{path}.partial"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def as_dict(report: Report) -> dict:
    return asdict(report)
