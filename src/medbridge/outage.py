"""The outage tolerance: how long a silent link may last before anything gives up, and every layer it sets.

One number — ``outage_tolerance`` in ``platform.toml``, ``job run --outage-tolerance``
— from which each layer's patience is derived, so that none gives up before the
others (a keepalive budget of its own was how a 300 s cut broke the mount path):

- the job's side (OpenSSH under sshfs, the loader, the upload, the wrapper's link
  watch) waits the tolerance, then says so;
- the platform keeps a silent session two keepalive rounds longer, so the job is
  always the side that decides and names the outage;
- TCP under both is asked to give up only after SSH has (``TCP_USER_TIMEOUT``).  Where
  the kernel holds to its own limit instead (Linux 6.18 drops a connection holding
  unacknowledged data after ``tcp_retries2`` back-offs, ~15 minutes by default, whatever
  the option says), a longer cut ends the connection: the loader, the upload and the
  link watch reconnect and go on; sshfs reconnects for files opened afterwards.

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
from typing import Any

#: The default, seconds: a 30-minute cut is waited out with ten minutes to spare (the original system survived 300 s).
DEFAULT_TOLERANCE = 2400.0
#: Smallest tolerance accepted (a keepalive a second, a handful of them).
MIN_TOLERANCE = 3.0
#: Longest tolerance accepted (a day): a dead client's session lingers this long.
MAX_TOLERANCE = 86400.0
#: How long the client's keepalive rounds may be at most, seconds.
MAX_INTERVAL = 15


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
