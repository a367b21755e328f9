"""One outage tolerance, each layer derived from it: the job gives up first, the platform later, TCP last."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from medbridge import outage
from medbridge.compute.job import ssh_config
from medbridge.compute.mount import sshfs_options
from medbridge.config import PlatformSettings
from medbridge.errors import InvalidInput


@pytest.mark.parametrize("tolerance", [3, 8, 20, 60, 299, 300, 1800, 2400, 86400])
def test_no_layer_gives_up_before_the_tolerance_and_the_platform_waits_longest(tolerance: float) -> None:
    client = outage.client_keepalive(tolerance)
    server = outage.server_keepalive(tolerance)
    assert tolerance <= client.budget < tolerance + client.interval, "the job waits the tolerance, about no more"
    assert server.budget >= client.budget + 2 * client.interval, "the platform keeps a silent session longer"
    assert outage.tcp_user_timeout_ms(tolerance) > (server.budget + server.interval) * 1000, "TCP gives up last"
    assert 1 <= client.interval <= outage.MAX_INTERVAL


def test_the_old_300_second_budgets_are_gone() -> None:
    """The issue's cause: sshfs 15x20 and the platform 30x10, both exactly 300 s."""
    default = outage.client_keepalive(outage.DEFAULT_TOLERANCE)
    assert default.budget >= 1800
    options = dict(o.split("=") for o in sshfs_options() if "=" in o)
    assert int(options["ServerAliveInterval"]) * int(options["ServerAliveCountMax"]) == default.budget


def test_ssh_config_waits_the_tolerance_and_dials_through_the_tuned_socket() -> None:
    cfg = ssh_config("10.0.0.1", 2201, "alice", Path("/a.sock"), Path("/kh"), tolerance=120)
    lines = dict(line.strip().split(" ", 1) for line in cfg.splitlines() if line.startswith("  "))
    k = outage.client_keepalive(120)
    assert (int(lines["ServerAliveInterval"]), int(lines["ServerAliveCountMax"])) == (k.interval, k.count)
    assert lines["ProxyUseFdpass"] == "yes"
    assert lines["ProxyCommand"].endswith(f"-m medbridge.compute.dial %h %p {outage.tcp_user_timeout_ms(120)}")


def test_platform_setting_is_checked() -> None:
    assert PlatformSettings.from_mapping({"outage_tolerance": 60}).outage_tolerance == 60.0
    assert PlatformSettings().outage_tolerance == outage.DEFAULT_TOLERANCE
    for bad in (0, 1, 10**9):
        with pytest.raises(InvalidInput, match="outage_tolerance must be 3 to 86400 seconds"):
            PlatformSettings.from_mapping({"outage_tolerance": bad})


def test_tune_sets_tcps_give_up_time_and_leaves_its_backoff_alone() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    with server, socket.create_connection(server.getsockname()) as sock:
        before = _rto_max(sock)
        outage.tune(sock, 123_000)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 123_000
        # a capped back-off makes Linux 6.18 drop the connection after ~a minute of retries, whatever the timeout
        assert _rto_max(sock) == before
        outage.tune(sock, 10**12)  # clamped, not an overflow
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 2**31 - 1
    with socket.socket(socket.AF_UNIX) as unix:
        outage.tune(unix, 1000)  # not TCP: left alone


def _rto_max(sock: socket.socket) -> int | None:
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_RTO_MAX_MS", 44))
    except OSError:  # Linux < 6.15 has no such option
        return None


def test_job_submit_passes_the_tolerance_to_job_run() -> None:
    from click.testing import CliRunner

    from medbridge.cli.main import cli

    args = ["job", "submit", "--platform", "gw:2201", "--key", "/k", "--host-key-fingerprint", "SHA256:x",
            "--outage-tolerance", "600", "--dry-run", "--", "python", "train.py"]  # fmt: skip
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "job run --platform gw:2201 --key /k --host-key-fingerprint SHA256:x --outage-tolerance 600 " in r.output
