"""The fast path's gate: on only for the tested asyncssh releases, off on request, one warning otherwise."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import asyncssh
import pytest
from asyncssh.sftp import SFTPServerHandler

from medbridge import fastpath
from medbridge.config import READ_FILE_EXTENSION
from medbridge.platform.requests import PASSED_EXTENSIONS
from medbridge.testing import RunningPlatform
from medbridge.testing.wait import HANG, Lines


@pytest.mark.parametrize(
    ("version", "environ", "on"),
    [
        ("2.23.1", {}, True),
        ("2.24.1", {}, True),
        ("2.24", {}, True),
        ("2.23.0", {}, False),
        ("2.25.0", {}, False),
        ("3.0.0", {}, False),
        ("2.24.2rc1", {}, False),
        ("2.24.1", {"MEDBRIDGE_FASTPATH": "off"}, False),
        ("2.24.1", {"MEDBRIDGE_FASTPATH": "0"}, False),
        ("2.24.1", {"MEDBRIDGE_FASTPATH": "on"}, True),
        ("2.25.0", {"MEDBRIDGE_FASTPATH": "on"}, False),  # no setting widens the tested range
        ("2.24.1", {"MEDBRIDGE_FASTPATH": "fast"}, False),
    ],
)
def test_the_gate(version: str, environ: dict[str, str], on: bool) -> None:
    got, why = fastpath.decide(version, environ)
    assert got is on and bool(why) is not on


def test_outside_the_range_one_warning_and_the_public_path(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("MEDBRIDGE_FASTPATH", raising=False)
    monkeypatch.setattr(asyncssh, "__version__", "2.99.0")
    fastpath.enabled.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, "medbridge.fastpath"):
            assert [fastpath.enabled() for _ in range(3)] == [False] * 3
    finally:
        fastpath.enabled.cache_clear()
    (warning,) = [r for r in caplog.records if r.name == "medbridge.fastpath"]
    assert "asyncssh 2.99.0 is outside the tested range" in warning.getMessage()


def test_the_installed_asyncssh_is_in_the_tested_range_and_pinned_to_it() -> None:
    """CI runs the fast path on what it installs: a release outside the range fails here, not silently slower."""
    assert fastpath.decide(asyncssh.__version__, {})[0], asyncssh.__version__
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    (low, high) = re.findall(r'"asyncssh>=([\d.]+),<([\d.]+)"', pyproject)[0]
    assert (fastpath._release(low), fastpath._release(high)) == fastpath.TESTED


def test_this_process_takes_the_path_ci_asked_for() -> None:
    assert fastpath.enabled() is (os.environ.get("MEDBRIDGE_FASTPATH", "on") != "off")


def test_the_handler_tables_it_extends_are_asyncssh_s() -> None:
    """The private tables SFTPHandler extends: if a release renames or reshapes them, this fails."""
    cls = fastpath._handler_class(PASSED_EXTENSIONS, 1 << 20)
    names = [name for name, _ in cls._extensions]
    assert READ_FILE_EXTENSION in names and b"copy-data" not in names and b"ranges@asyncssh.com" not in names
    assert set(names) - {READ_FILE_EXTENSION} <= PASSED_EXTENSIONS
    assert cls._packet_handlers[READ_FILE_EXTENSION] is fastpath.SFTPHandler._process_read_file
    assert set(SFTPServerHandler._packet_handlers) < set(cls._packet_handlers)
    assert 5 in SFTPServerHandler._packet_handlers  # FXP_READ, answered in place


def test_platform_serve_decides_at_start_up_and_says_it_once(tmp_path: Path) -> None:
    """Before any connection, and once for two workers: the gate is decided before they fork."""
    home = RunningPlatform(tmp_path).home.root
    cmd = [sys.executable, "-m", "medbridge", "platform", "serve", "--home", str(home), "--listen", "127.0.0.1:0",
           "--workers", "2"]  # fmt: skip
    env = {**os.environ, "MEDBRIDGE_FASTPATH": "sometimes"}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as server:
        assert server.stdout is not None and server.stderr is not None
        out, err = Lines(server.stdout), Lines(server.stderr)
        try:
            out.wait_for("listening")
            err.wait_for("public path only")
        finally:
            server.terminate()
            server.wait(HANG)
        said, _ = err.join(), out.join()
    assert said.count("public path only") == 1 and "'sometimes' is not on or off" in said, said
