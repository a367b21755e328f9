"""The outage tolerance: how long a silent link may last before anything gives up, and every layer it sets.

One number — ``outage_tolerance`` in ``platform.toml``, ``job run --outage-tolerance``
— from which each layer's patience is derived, so that none gives up before the
others (a keepalive budget of its own was how a 300 s cut broke the mount path):

- the job's side (OpenSSH under sshfs, the loader, the upload, the wrapper's link
  watch) waits the tolerance, then says so;
- the platform keeps a silent session two keepalive rounds longer, so the job is
  always the side that decides and names the outage;
- TCP under both is asked to give up only after SSH has (``TCP_USER_TIMEOUT``);
- what the option does not cover: a connection that cannot send at all — its peer's
  receive window full when the link went silent, or its own sends failing at its host
  (a firewall rule, its link down) — *probes* instead of retransmitting, and Linux
  drops it after ``net.ipv4.tcp_retries2`` unanswered probes whatever
  ``TCP_USER_TIMEOUT`` says (``tcp_probe_timer``; measured on 6.18: 4-5 s at 3, about
  15 minutes at the default 15).  The gateway's side of a job's connection then dies
  mid-cut, and the job's read fails when the link returns: how a 30-minute cut broke
  the mount path (``bench outage`` cuts at gw).  So the gateway and the platform hosts need
  ``tcp_retries2`` of :func:`persist_retries` of their patience (the test sites set it
  in their namespaces); both say at start when it is lower (:func:`persist_shortfall`).
  Where it still happens (a node's own kernel, not ours to tune), the loader, the
  upload and the link watch reconnect and go on; sshfs reconnects for files opened
  afterwards.

TCP's retransmission back-off is left alone: capping it (``TCP_RTO_MAX_MS``) would make
a returning link noticed sooner, but the kernel then drops the connection after its
retries at the capped interval (about a minute at 5 s), far inside any tolerance.

Revocation, expiry and the end of a job do not wait for any of this: the platform's
enforcement closes those sessions on its own tick.
"""

from __future__ import annotations

import contextlib
import math
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The default, seconds: a 30-minute cut is waited out with ten minutes to spare (the original system survived 300 s).
DEFAULT_TOLERANCE = 2400.0
#: Smallest tolerance accepted (a keepalive a second, a handful of them).
MIN_TOLERANCE = 3.0
#: Longest tolerance accepted (a day): a dead client's session lingers this long.
MAX_TOLERANCE = 86400.0
#: How long the client's keepalive rounds may be at most, seconds.
MAX_INTERVAL = 15
#: Linux's unanswered zero-window probes before it drops a connection (per network namespace).
RETRIES2 = Path("/proc/sys/net/ipv4/tcp_retries2")
#: Linux's shortest first probe interval (``TCP_RTO_MIN``) and longest interval (``TCP_RTO_MAX``), seconds.
RTO_MIN, RTO_MAX = 0.2, 120.0
#: Intervals that double before they reach ``RTO_MAX`` (200 ms x 2**10 > 120 s).
DOUBLINGS = 10
#: The most ``tcp_retries2`` Linux accepts (a byte on this kernel; older ones took more: what we advise at most).
MAX_RETRIES2 = 255


@dataclass(frozen=True)
class Keepalive:
    """SSH keepalives: one every ``interval`` seconds of silence, given up after ``count`` unanswered."""

    interval: int
    count: int

    @property
    def budget(self) -> int:
        """Seconds of silence before this side gives up."""
        return self.interval * self.count


def check(tolerance: float, origin: str = "outage tolerance") -> float:
    """The tolerance, or a ValueError naming the valid range."""
    if not MIN_TOLERANCE <= tolerance <= MAX_TOLERANCE:
        raise ValueError(f"{origin} must be {MIN_TOLERANCE:.0f} to {MAX_TOLERANCE:.0f} seconds, not {tolerance:g}")
    return float(tolerance)


def client_keepalive(tolerance: float) -> Keepalive:
    """The job side's keepalives: silent for ``tolerance`` seconds (rounded up to a round), then give up."""
    interval = max(1, min(MAX_INTERVAL, int(tolerance // 10)))
    return Keepalive(interval, max(1, math.ceil(tolerance / interval)))


def server_keepalive(tolerance: float) -> Keepalive:
    """The platform's keepalives: two rounds longer than any job's, so the job is the side that decides."""
    k = client_keepalive(tolerance)
    return Keepalive(k.interval, k.count + 2)


def tcp_user_timeout_ms(tolerance: float) -> int:
    """How long TCP keeps unacknowledged data before it drops the connection: after SSH would have."""
    k = server_keepalive(tolerance)
    return int((k.budget + 2 * k.interval + 30) * 1000)


def tune(sock: Any, user_timeout_ms: int) -> None:
    """Ask TCP to hold unacknowledged data ``user_timeout_ms`` before it gives up, on a connected socket (Linux).

    Best effort: where the option is missing or the kernel keeps its own limit (see the
    module's docstring), the connection may end sooner, and the layers above reconnect.
    """
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):  # None: the connection has closed
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(0, min(user_timeout_ms, 2**31 - 1)))


def probing_seconds(retries: int) -> float:
    """How long, at least, Linux probes over a silent link before it drops the connection.

    It gives up when a probe timer fires with ``retries`` (``tcp_retries2``) probes
    unanswered: ``retries`` + 1 intervals, each double the last from 200 ms, at most
    120 s — 15, the default, is ~925 s.  At least: a back-off already raised when the link
    went makes it longer.
    """
    n = max(0, retries) + 1
    doubling = min(n, DOUBLINGS)  # 200 ms x 2**i stays under 120 s for i < 10
    return RTO_MIN * (2.0**doubling - 1) + RTO_MAX * (n - doubling)


def persist_retries(seconds: float) -> int:
    """The ``tcp_retries2`` whose probing outlasts ``seconds`` of silence, at most Linux's 255."""
    retries = 0
    while retries < MAX_RETRIES2 and probing_seconds(retries) < seconds:
        retries += 1
    return retries


def persist_shortfall(seconds: float, setting: Path | None = None) -> str | None:
    """Why this host's kernel may drop a connection before ``seconds`` of silence, or None (or not Linux)."""
    try:
        retries = int((setting or RETRIES2).read_text().strip())
    except (OSError, ValueError):
        return None
    held = probing_seconds(retries)
    if held >= seconds:
        return None
    need = persist_retries(seconds)
    why = (f"net.ipv4.tcp_retries2 is {retries}: a connection that cannot send when the link goes silent (its "
           f"peer slow to read, or its own sends failing at this host) is dropped by this host's kernel after "
           f"~{held:.0f} s, not {seconds:.0f} s")  # fmt: skip
    if probing_seconds(need) < seconds:
        most = probing_seconds(need) / 3600
        return (f"{why}; Linux allows at most {MAX_RETRIES2}, which holds ~{most:.1f} h: set it to {need} (sysctl -w "
                f"net.ipv4.tcp_retries2={need}, and in /etc/sysctl.d) and expect such a connection to end sooner "
                "than that")  # fmt: skip
    return f"{why}; set it to {need} (sysctl -w net.ipv4.tcp_retries2={need}, and in /etc/sysctl.d)"
