"""Three sites on one machine: ``hpc`` — ``gw`` — ``platform``, as Linux network namespaces; with
``Sites(FOUR_PLACES)`` the original system's four places (a second campus and the experimental server too),
and with ``platform2``, ``platform3`` more platform hosts beside the first (``Sites(with_hosts(2))``).

    hpc (compute nodes)          gw (gateway)                    platform
    10.N.1.2, 10.N.1.3  ──veth── 10.N.1.1 │ 10.N.2.1  ──veth──  10.N.2.2
                                 10.N.3.1 │ 10.N.4.1
    campus  10.N.3.2    ──veth───────┘    │    └───────veth──   10.N.4.2  exp (experimental server)
                                          └ 10.N.5.1 ──veth──   10.N.5.2  platform2 (10.N.6.2 platform3)

The gateway namespace does not forward packets: the only way from one place to another
is a process in ``gw`` (the medbridge gateway, or a delay relay).  Links can be cut and
restored (iptables DROP inside ``gw``), rate-limited (``tc tbf``); delay comes from
:mod:`medbridge.testing.delay` because ``tc netem`` is missing here: each link has a
one-way delay (``delays_ms``), and :meth:`Sites.delayed` starts the relay that carries a
place's connections to another with the delays of both links.  Everything is removed by
:meth:`Sites.stop`: processes by PID, then the namespaces (and with them their veths and
iptables rules).  Needs root.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import shutil
import subprocess
import sys
from collections.abc import Sequence
from types import TracebackType

from medbridge import outage, processes
from medbridge.gateway.config import IDLE_TIMEOUT


def available() -> str | None:
    """Why the three sites cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (iproute2, iptables)"
    probe = f"mbprobe{secrets.token_hex(3)}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create network namespaces: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


THREE_SITES = ("hpc", "gw", "platform")
#: The original system's places: the HPC centre, a second campus, the data platform, the experimental server.
FOUR_PLACES = ("hpc", "gw", "platform", "campus", "exp")
#: Platform hosts beside ``platform``: each a place of its own on a link of its own to gw.
PLATFORM_HOSTS = ("platform", "platform2", "platform3")
#: One-way delay per link in ms (place to gw), rising with distance as in the original's RTT figure.
DEFAULT_DELAYS_MS = {"hpc": 0.5, "platform": 0.5, "platform2": 0.5, "platform3": 0.5, "exp": 1.0, "campus": 3.0}
_SUBNET = {"hpc": 1, "platform": 2, "campus": 3, "exp": 4, "platform2": 5, "platform3": 6}


def with_hosts(n: int, places: Sequence[str] = THREE_SITES) -> tuple[str, ...]:
    """``places`` with ``n`` platform hosts: ``platform``, ``platform2``, …"""
    if not 1 <= n <= len(PLATFORM_HOSTS):
        raise ValueError(f"1 to {len(PLATFORM_HOSTS)} platform hosts (got {n})")
    return (*places, *(p for p in PLATFORM_HOSTS[:n] if p not in places))


class Sites:
    """The namespaces, their addresses, and the processes started in them."""

    def __init__(self, places: Sequence[str] = THREE_SITES, delays_ms: dict[str, float] | None = None) -> None:
        unknown = set(places) - set(FOUR_PLACES) - set(PLATFORM_HOSTS)
        if unknown or not set(THREE_SITES) <= set(places):
            raise ValueError(
                f"places: hpc, gw and platform, and any of campus, exp, platform2, platform3 (got {', '.join(places)})"
            )
        tag = secrets.token_hex(2)
        self.net = 100 + int(tag, 16) % 150
        self.ns = {site: f"mb{tag}-{site}" for site in places}
        self.node = f"10.{self.net}.1.2"
        self.other_node = f"10.{self.net}.1.3"
        self.gw_hpc_side = f"10.{self.net}.1.1"
        self.gw_platform_side = f"10.{self.net}.2.1"
        self.platform = f"10.{self.net}.2.2"
        #: Each place's own address, and gw's address on the place's link.
        self.address = {p: f"10.{self.net}.{_SUBNET[p]}.2" for p in places if p != "gw"}
        self.gw_side = {p: f"10.{self.net}.{_SUBNET[p]}.1" for p in places if p != "gw"}
        self.delays_ms = {p: (delays_ms or DEFAULT_DELAYS_MS).get(p, 0.0) for p in self.address}
        self._veth = {"hpc": f"mb{tag}h", "gw-hpc": f"mb{tag}gh", "gw-platform": f"mb{tag}gp", "platform": f"mb{tag}p"}
        for p in set(places) - set(THREE_SITES):
            self._veth[p], self._veth[f"gw-{p}"] = f"mb{tag}{_SUBNET[p]}", f"mb{tag}g{_SUBNET[p]}"
        self._procs: list[subprocess.Popen[bytes]] = []
        self._made: list[str] = []

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def exec(self, site: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns[site], *args], capture_output=True, text=True)

    def start(self) -> Sites:
        try:
            for name in self.ns.values():
                self._ip("netns", "add", name)
                self._made.append(name)
            v = self._veth
            self._ip("link", "add", v["hpc"], "netns", self.ns["hpc"], "type", "veth", "peer", "name", v["gw-hpc"],
                     "netns", self.ns["gw"])  # fmt: skip
            self._ip("link", "add", v["gw-platform"], "netns", self.ns["gw"], "type", "veth", "peer", "name",
                     v["platform"], "netns", self.ns["platform"])  # fmt: skip
            plan = [("hpc", v["hpc"], [f"{self.node}/24", f"{self.other_node}/24"]),
                    ("gw", v["gw-hpc"], [f"{self.gw_hpc_side}/24"]),
                    ("gw", v["gw-platform"], [f"{self.gw_platform_side}/24"]),
                    ("platform", v["platform"], [f"{self.platform}/24"])]  # fmt: skip
            for p in set(self.ns) - set(THREE_SITES):
                self._ip("link", "add", v[p], "netns", self.ns[p], "type", "veth", "peer", "name", v[f"gw-{p}"],
                         "netns", self.ns["gw"])  # fmt: skip
                plan += [(p, v[p], [f"{self.address[p]}/24"]), ("gw", v[f"gw-{p}"], [f"{self.gw_side[p]}/24"])]
            for site, dev, addrs in plan:
                for a in addrs:
                    self._ip("-n", self.ns[site], "addr", "add", a, "dev", dev)
                self._ip("-n", self.ns[site], "link", "set", dev, "up")
            for site in self.ns:
                self._ip("-n", self.ns[site], "link", "set", "lo", "up")
            self.exec("gw", "sysctl", "-qw", "net.ipv4.ip_forward=0")
            retries = outage.persist_retries(IDLE_TIMEOUT)  # as the operator guides say for our hosts
            for site in set(self.ns) - {"hpc", "campus"}:  # the compute nodes' kernels are not ours to tune
                self.exec(site, "sysctl", "-qw", f"net.ipv4.tcp_retries2={retries}").check_returncode()
        except BaseException:
            self.stop()
            raise
        return self

    def popen(self, site: str, args: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        """Start a process inside a site; :meth:`stop` ends it by PID."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns[site], *args], **kw)  # type: ignore[call-overload]
        self._procs.append(proc)
        return proc  # type: ignore[no-any-return]

    def delayed(self, src: str, dst: str, port: int, timeout: float = 30) -> tuple[str, int]:
        """A delay relay in ``gw`` carrying ``src``'s connections to ``port`` at ``dst`` with both links' one-way
        delays (each direction); where ``src`` connects to reach it."""
        listen = self.gw_side[src]
        one_way = self.delays_ms[src] + self.delays_ms[dst]
        proc = self.popen("gw", [sys.executable, "-m", "medbridge.testing.delay", "--listen", f"{listen}:0",
                                 "--target", f"{self.address[dst]}:{port}", "--delay-ms", str(one_way)],
                          stdout=subprocess.PIPE)  # fmt: skip
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline().decode() if ready else ""
        if "delay relay" not in line:
            raise RuntimeError(f"the delay relay {src}->{dst} did not start: {line.strip() or 'no answer'}")
        return listen, int(line.split()[2].rsplit(":", 1)[1])

    # -- link faults ------------------------------------------------------------------

    def _gw_dev(self, link: str) -> str:
        return self._veth[f"gw-{link}"]

    def cut(self, link: str = "hpc") -> None:
        """Drop every packet on the gw side of a place's link (TCP stays up, silent)."""
        dev = self._gw_dev(link)
        for chain, flag in (("INPUT", "-i"), ("OUTPUT", "-o")):
            self.exec("gw", "iptables", "-I", chain, flag, dev, "-j", "DROP").check_returncode()

    def dropped(self, link: str = "hpc") -> int:
        """Packets the cut of ``link`` has dropped so far, both directions (what a test waits on, not a time)."""
        dev = self._gw_dev(link)
        total = 0
        for chain, column in (("INPUT", 5), ("OUTPUT", 6)):  # pkts bytes target prot opt in out source destination
            listing = self.exec("gw", "iptables", "-L", chain, "-v", "-x", "-n")
            listing.check_returncode()
            for line in listing.stdout.splitlines()[2:]:
                fields = line.split()
                if len(fields) > column and fields[2] == "DROP" and fields[column] == dev:
                    total += int(fields[0])
        return total

    def restore(self, link: str = "hpc") -> None:
        dev = self._gw_dev(link)
        for chain, flag in (("INPUT", "-i"), ("OUTPUT", "-o")):
            self.exec("gw", "iptables", "-D", chain, flag, dev, "-j", "DROP").check_returncode()

    def limit(self, link: str, rate_mbit: float) -> None:
        """Cap the gw→``link`` direction with tc tbf."""
        self.exec("gw", "tc", "qdisc", "replace", "dev", self._gw_dev(link), "root", "tbf", "rate",
                  f"{rate_mbit}mbit", "burst", "64kb", "latency", "200ms").check_returncode()  # fmt: skip

    # -- teardown ---------------------------------------------------------------------

    def stop(self) -> None:
        for proc in reversed(self._procs):
            processes.stop(proc, timeout=15)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        self._procs.clear()
        for name in reversed(self._made):
            with contextlib.suppress(subprocess.CalledProcessError):
                self._ip("netns", "del", name)
        self._made.clear()

    def __enter__(self) -> Sites:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
