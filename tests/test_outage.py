"""One outage tolerance, each layer derived from it: the job gives up first, the platform later, TCP last."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from medbridge import outage, processes
from medbridge.compute.job import ssh_config
from medbridge.compute.mount import sshfs_options
from medbridge.config import PlatformSettings
from medbridge.errors import InvalidInput
from medbridge.gateway.config import IDLE_TIMEOUT
from medbridge.testing import netns, wait


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


def test_persist_retries_outlast_the_patience_asked_and_no_fewer() -> None:
    assert outage.probing_seconds(15) == pytest.approx(924.6), "Linux's default: ~15 minutes (939 s measured)"
    for seconds in (10, 300, 2490, 3600, 29000):
        retries = outage.persist_retries(seconds)
        assert outage.probing_seconds(retries) >= seconds > outage.probing_seconds(retries - 1)
    assert outage.persist_retries(86400) == outage.persist_retries(float("inf")) == 255, "Linux's most"
    assert outage.probing_seconds(10**12) > 0, "a huge setting (older kernels) is arithmetic, not an overflow"


def test_persist_shortfall_names_the_setting_and_the_value_to_set(tmp_path: Path) -> None:
    setting = tmp_path / "tcp_retries2"
    setting.write_text("15\n")
    why = outage.persist_shortfall(3600, setting)
    assert why is not None and "tcp_retries2 is 15" in why and "~925 s" in why and "tcp_retries2=38" in why
    setting.write_text("38\n")
    assert outage.persist_shortfall(3600, setting) is None
    setting.write_text("15\n")
    beyond = outage.persist_shortfall(86400, setting)
    assert beyond is not None and "at most 255, which holds ~8.3 h" in beyond and "tcp_retries2=255" in beyond
    setting.write_text("99999999999\n")
    assert outage.persist_shortfall(86400, setting) is None, "an older kernel's huge value holds long enough"
    assert outage.persist_shortfall(3600, tmp_path / "missing") is None, "not Linux: nothing to say"


_RECEIVER = """
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before listen: the connection's window stays small
srv.bind((sys.argv[1], 7100))
srv.listen()
print("listening", flush=True)
conn, _ = srv.accept()
print("accepted", flush=True)
sys.stdin.readline()  # never reads until told: its window fills and stays zero
total = 0
while chunk := conn.recv(65536):
    total += len(chunk)
print(total, flush=True)
"""

_SENDER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
s.connect((sys.argv[1], 7100))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 3600 * 1000)  # the gateway's patience
s.setblocking(False)
sent = 0
while True:
    try:
        sent += s.send(b"x" * 4096)
    except BlockingIOError:
        break
print("full", flush=True)
s.setblocking(True)
try:
    s.sendall(b"y" * 4 * 2**20)  # far more than the node's window: blocks until it reads, or the connection dies
    s.shutdown(socket.SHUT_WR)
    print("sent", sent + 4 * 2**20, flush=True)
except OSError as exc:
    print("died", exc.errno, flush=True)
"""


@pytest.mark.skipif(netns.available() is not None, reason=f"no network namespaces here: {netns.available()}")
def test_a_zero_window_over_a_silent_link_lives_as_long_as_tcp_retries2_allows_whatever_the_user_timeout() -> None:
    """Why the sites (and the operator guides) raise ``tcp_retries2`` at gw and the platform.

    The node stops reading, so gw's side probes a zero window; the link is cut at gw (its
    own sends fail too: the same probing). At gw's retries2 = 2 the connection dies
    mid-cut (ETIMEDOUT) though TCP_USER_TIMEOUT is an hour: the cause of a 30-minute cut
    failing on the mount path. At the sites' setting
    it outlives more probes than that, and every byte arrives once the link returns.
    Waits on events (a probe count, the sender's word), never on a time.
    """
    with netns.Sites() as sites:
        assert sites.exec("gw", "sysctl", "-n", "net.ipv4.tcp_retries2").stdout.strip() == str(
            outage.persist_retries(IDLE_TIMEOUT))  # fmt: skip
        sites.exec("gw", "sysctl", "-qw", "net.ipv4.tcp_retries2=2").check_returncode()
        assert _zero_window_through_a_cut(sites, probes=None) == "died 110"
        sites.exec("gw", "sysctl", "-qw", f"net.ipv4.tcp_retries2={outage.persist_retries(IDLE_TIMEOUT)}")
        assert _zero_window_through_a_cut(sites, probes=4).startswith("sent")


def _zero_window_through_a_cut(sites: netns.Sites, probes: int | None) -> str:
    """Fill the node's window from gw, cut the link; ``probes``: restore after that many unanswered probes."""
    receiver = _in(sites, "hpc", _RECEIVER)
    sender: subprocess.Popen[str] | None = None
    try:
        assert receiver.stdout is not None and receiver.stdin is not None
        assert receiver.stdout.readline().strip() == "listening"
        sender = _in(sites, "gw", _SENDER)
        assert sender.stdout is not None
        told = wait.Lines(sender.stdout)
        assert receiver.stdout.readline().strip() == "accepted"
        told.wait_for("full")
        wait.until(lambda: _persist(sites) is not None, "gw probing the node's zero window")
        sites.cut("hpc")
        try:
            if probes is None:  # it dies during the cut (a hang is bounded by the wait)
                return told.wait_for("died").strip()
            wait.until(lambda: (_persist(sites) or 0) >= probes, f"{probes} unanswered probes")
        finally:
            sites.restore("hpc")
        receiver.stdin.write("read\n")
        receiver.stdin.flush()
        said = told.wait_for("sent").strip()
        assert receiver.stdout.readline().strip() == said.split()[-1], "every byte arrived"
        return said
    finally:
        for proc in (sender, receiver):
            if proc is not None:
                processes.stop(proc, timeout=5)
                for pipe in (proc.stdin, proc.stdout):
                    if pipe is not None:
                        pipe.close()


def _in(sites: netns.Sites, site: str, script: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["ip", "netns", "exec", sites.ns[site], sys.executable, "-c", script, sites.node],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip


def _persist(sites: netns.Sites) -> int | None:
    """Unanswered zero-window probes of gw's connection to the node, or None when it is not probing."""
    found = re.search(r"timer:\(persist,[^,]*,(\d+)\)", sites.exec("gw", "ss", "-tno", "dport", "=", ":7100").stdout)
    return int(found.group(1)) if found else None
