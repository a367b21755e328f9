"""The job's watch on its link to the platform: when it went quiet or was reset, for how long, and past the tolerance?

A payload whose read fails after a cut sees only ``EIO`` or a ``ConnectionError``; the
wrapper has to say what happened.  It keeps one enrolment-key connection (it opens no
data) that sends a keepalive after every second of silence, and asks the kernel when
data last arrived on it (``TCP_INFO``): quiet for :data:`QUIET` seconds is an outage,
which ends when data arrives again.  A connection that ends (reset, closed, or given up
after the tolerance) is an outage until a new one is up.  Outages go into the job's
summary line and its end-of-job report, so the platform's audit log records them.
"""

from __future__ import annotations

import asyncio
import math
import socket
import struct
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from medbridge import outage
from medbridge.compute.credentials import Enrolment, connect_enrolment
from medbridge.errors import MedbridgeError

#: Seconds without data (a keepalive is answered every second) that count as an outage.
QUIET = 5.0
#: How often the watch looks, seconds.
PERIOD = 0.5
_LAST_DATA_RECV = struct.Struct("=I")
_LAST_DATA_RECV_AT = 52  # offset of tcpi_last_data_recv (ms) in Linux's struct tcp_info


@dataclass
class Outage:
    """One outage: from when the platform was last heard, for how long (None while it lasts)."""

    started: float
    how: str  # "silent": nothing arrived; "reset": the connection ended at once; "lost": it ended after silence
    tolerance: float
    seconds: float | None = None
    still: bool = False  # the job ended before the link came back

    def length(self, now: float | None = None) -> float:
        return self.seconds if self.seconds is not None else (now or time.time()) - self.started

    @property
    def beyond(self) -> bool:
        return self.length() > self.tolerance

    def describe(self) -> str:
        at = datetime.fromtimestamp(self.started, UTC).strftime("%H:%M:%S UTC")
        what = "reset" if self.how == "reset" else "down"
        still = ", still down at the end" if self.still or self.seconds is None else ""
        told = f", longer than the outage tolerance of {self.tolerance:.0f} s" if self.beyond else ""
        return f"the link to the platform was {what} for {self.length():.0f} s from {at}{still}{told}"

    def as_dict(self) -> dict[str, Any]:
        return {"started": datetime.fromtimestamp(self.started, UTC).isoformat(), "seconds": round(self.length(), 1),
                "beyond": self.beyond, "how": self.how, "tolerance": self.tolerance, "still": self.still}  # fmt: skip


def quiet_for(sock: Any) -> float | None:
    """Seconds since data last arrived on a TCP socket (Linux), or None where the kernel does not say."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except (OSError, AttributeError):
        return None
    if len(info) < _LAST_DATA_RECV_AT + 4:
        return None
    return float(_LAST_DATA_RECV.unpack_from(info, _LAST_DATA_RECV_AT)[0]) / 1000.0


class LinkWatch(threading.Thread):
    """Watches the link for the job's lifetime; :attr:`outages` is what it saw."""

    def __init__(self, enrolment: Enrolment, tolerance: float, quiet: float = QUIET):
        super().__init__(name="medbridge-linkwatch", daemon=True)
        self.enrolment = enrolment
        self.tolerance = tolerance
        self.quiet = quiet
        self.outages: list[Outage] = []
        self.connected = threading.Event()
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        asyncio.run(self._watch())

    def stop(self) -> list[Outage]:
        """Stop watching; an outage still going is kept with its length so far."""
        self._halt.set()
        if self.is_alive():
            self.join(timeout=15)
        with self._lock:
            return list(self.outages)

    def during(self) -> Outage | None:
        """The outage that mattered most: the longest beyond the tolerance, else the last reset, else the longest."""
        with self._lock:
            seen = list(self.outages)
        beyond = [o for o in seen if o.beyond]
        resets = [o for o in seen if o.how == "reset"]
        pick = beyond or resets[-1:] or seen
        return max(pick, key=lambda o: o.length()) if pick else None

    def _begin(self, heard: float, how: str) -> Outage:
        o = Outage(heard, how, self.tolerance)
        with self._lock:
            self.outages.append(o)
        return o

    def _end(self, o: Outage, at: float) -> None:
        with self._lock:
            o.seconds = max(0.0, at - o.started)

    async def _watch(self) -> None:
        heard = time.time()
        current: Outage | None = None
        while not self._halt.is_set():
            try:
                conn = await connect_enrolment(
                    self.enrolment,
                    keepalive_interval=1,
                    keepalive_count_max=math.ceil(self.tolerance),
                    connect_timeout=5,
                )
            except MedbridgeError:
                current = current or self._begin(heard, "lost")
                await asyncio.sleep(1.0)
                continue
            heard = time.time()
            if current is not None:
                self._end(current, heard)
                current = None
            self.connected.set()
            sock = conn.get_extra_info("socket")
            outage.tune(sock, outage.tcp_user_timeout_ms(self.tolerance))
            closed = asyncio.ensure_future(conn.wait_closed())
            try:
                while not self._halt.is_set() and not closed.done():
                    await asyncio.wait([closed], timeout=PERIOD)
                    quiet = quiet_for(sock)
                    if quiet is None or closed.done():
                        continue
                    now = time.time()
                    if current is None and quiet > self.quiet:
                        current = self._begin(now - quiet, "silent")
                    elif current is not None and quiet < self.quiet:
                        self._end(current, now - quiet)
                        current = None
                    if current is None:
                        heard = now - quiet
            finally:
                conn.close()
                await closed
            if not self._halt.is_set() and current is None:
                current = self._begin(heard, "reset" if time.time() - heard < self.quiet else "lost")
        if current is not None and current.seconds is None:
            with self._lock:
                current.seconds, current.still = time.time() - current.started, True
