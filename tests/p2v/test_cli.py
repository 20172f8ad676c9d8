"""The command line: every family's commands, global options, the console script."""

from __future__ import annotations

import argparse
import contextlib
import io

from p2v import cli


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


COMMANDS = sorted(_subparsers(cli.build_parser()))


def test_every_family_registers_its_commands():
    assert {"info", "convert", "check", "compare", "map", "create", "clone", "migrate",
            "receive", "ovf", "resize", "v2v"} <= set(COMMANDS)  # fmt: skip


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, err.getvalue()


def test_an_unknown_command_names_the_real_ones():
    code, out = _run(["--debug", "convrt", "a", "b"])
    assert code == 2
    assert "invalid choice: 'convrt'" in out and "'convert'" in out and "'v2v'" in out


def test_global_options_before_the_command(tmp_path):
    image = tmp_path / "a.raw"
    image.write_bytes(bytes(4096))
    code, out = _run(["--debug", "info", "--output", "json", str(image)])
    assert code == 0 and '"virtual-size": 4096' in out


def test_the_console_script_flushes_and_exits_with_mains_status(tmp_path):
    # what was printed reaches a file (block-buffered), and the status is main()'s
    import subprocess
    import sys

    image = tmp_path / "a.raw"
    image.write_bytes(bytes(4096))
    script = "from p2v.cli import run; run()"
    out = tmp_path / "out.json"
    with open(out, "w") as f:
        ok = subprocess.run([sys.executable, "-c", script, "info", "--output", "json",
                             str(image)], stdout=f, stderr=subprocess.PIPE)  # fmt: skip
    assert ok.returncode == 0 and '"virtual-size": 4096' in out.read_text()
    bad = subprocess.run([sys.executable, "-c", script, "info", str(tmp_path / "none")],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 1 and bad.stderr.startswith("p2v: error:")
