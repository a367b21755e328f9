"""Where benchmark readers reach servers: the choice of network, and starts that fail say why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medbridge.bench import network
from medbridge.errors import InvalidInput, PlatformUnavailable


def test_sites_without_namespaces_is_a_clear_error_and_auto_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # stands in for a machine without namespaces (this one has them): only the check's answer is replaced
    monkeypatch.setattr(network.netns, "available", lambda: "needs root for network namespaces")
    with pytest.raises(InvalidInput, match=r"^--network sites: needs root for network namespaces$"):
        network.choose("sites", Path("/nonexistent"))
    assert isinstance(network.choose("auto", Path("/nonexistent")), network.Loopback)
    with pytest.raises(InvalidInput, match=r"^--network 'lan': choose from auto, loopback, sites$"):
        network.choose("lan", Path("/nonexistent"))


def test_sites_that_cannot_be_built_fall_back_on_auto_and_fail_on_sites(monkeypatch: pytest.MonkeyPatch) -> None:
    # stands in for a host where a namespace can be made but a veth cannot (not reproducible on purpose here)
    monkeypatch.setattr(network.netns, "available", lambda: None)

    def refuse(self: object) -> None:
        said = b"RTNETLINK answers: Operation not permitted\n"
        raise subprocess.CalledProcessError(2, ["ip", "link", "add"], b"", said)

    monkeypatch.setattr(network.netns.Sites, "start", refuse)
    assert isinstance(network.choose("auto", Path("/nonexistent")), network.Loopback)
    with pytest.raises(PlatformUnavailable, match=r"could not be built: RTNETLINK answers: Operation not permitted$"):
        network.choose("sites", Path("/nonexistent"))


def test_a_process_that_does_not_start_is_stopped_and_says_why(tmp_path: Path) -> None:
    log = tmp_path / "err.log"
    script = ("import sys, time; print('bad config: port 99999', file=sys.stderr, flush=True); "
              "print('not ready', flush=True); time.sleep(30)")  # fmt: skip
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        with pytest.raises(PlatformUnavailable, match=r"^the gateway did not start: bad config: port 99999$"):
            network.first_line(proc, "route bench", "the gateway", log)
        assert proc.poll() is not None  # stopped, by its PID
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
