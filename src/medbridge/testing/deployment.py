"""The whole deployment on the three sites, each part a process that can be stopped, killed and started again.

    hpc: ``medbridge job run`` (sshfs, the loader)  →  gw: ``medbridge gateway serve``  →  platform: ``platform serve``
                                                                                         (platform2, …: more hosts)

The platform's home is a :class:`~medbridge.testing.RunningPlatform` (users, datasets,
grants, the audit log), served here by a process of its own in the ``platform``
namespace; the gateway routes ``gw:2201`` to it with PROXY v2 and counts bytes
(``/metrics`` on the gateway's loopback).  Faults are made where they happen in life:
links cut or reset at ``gw`` (:class:`~medbridge.testing.netns.Sites`), a gateway or a
platform stopped, killed and restarted.  Used by the fault tests and ``bench outage``.

With sites that have more platform hosts (``Sites(with_hosts(2))``), every host serves
the same home and the gateway's route lists them all as backends.  The home then stands
for the site's shared file system (here one folder that every namespace sees) and its
``database_url`` must name one PostgreSQL for all hosts (here reached on its Unix
socket, which every namespace sees too): the host key, the user CA, the storage and
the limits' lock files are shared, as docs/platform-operator-guide.md lays out.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medbridge import processes
from medbridge.testing import RunningPlatform
from medbridge.testing.netns import PLATFORM_HOSTS, Sites

PLATFORM_PORT, GATEWAY_PORT, METRICS_PORT = 2222, 2201, 9101


def first_line(proc: subprocess.Popen[bytes], words: str, what: str, timeout: float = 60) -> str:
    """The first line ``proc`` prints, which must contain ``words`` (else: what it said, as an error)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().decode(errors="replace") if ready else ""
    if words not in line:
        processes.stop(proc, timeout=10)
        raise RuntimeError(f"{what} did not start: {line.strip() or 'no answer'}")
    return line


class Deployment:
    """A platform home served at ``platform`` (and every other platform host of ``sites``), a gateway at ``gw``,
    jobs run at ``hpc``."""

    def __init__(self, sites: Sites, root: Path, database_url: str = "", **settings: Any):
        self.sites = sites
        self.root = root
        #: The platform hosts: ``platform``, then ``platform2``, … where ``sites`` has them.
        self.hosts = [p for p in PLATFORM_HOSTS if p in sites.ns]
        if len(self.hosts) > 1 and not database_url.startswith("postgresql"):
            raise ValueError("several platform hosts share one PostgreSQL (a SQLite file is one host's)")
        settings.setdefault("trusted_proxies", [f"{sites.gw_side[p]}/32" for p in self.hosts])
        self.home = RunningPlatform(root / "platform", database_url, **settings)
        self.platforms: dict[str, subprocess.Popen[bytes]] = {}
        self.gateway: subprocess.Popen[bytes] | None = None
        self.fingerprint = ""
        self.gateway_config = root / "gateway.toml"
        self.write_route(self.hosts)

    def write_route(self, hosts: Sequence[str]) -> None:
        """The gateway's configuration: its route ``prod`` to ``hosts`` (read when the gateway starts)."""
        backends = ", ".join(f'"{self.sites.address[p]}:{PLATFORM_PORT}"' for p in hosts)
        self.gateway_config.write_text(
            f'[[route]]\nname = "prod"\nlisten = "{self.sites.gw_hpc_side}:{GATEWAY_PORT}"\n'
            f'backends = [{backends}]\nallow = ["{self.sites.node}/32"]\nproxy_protocol = true\n'
            f'[metrics]\nlisten = "127.0.0.1:{METRICS_PORT}"\n'
        )

    def via(self, host: str) -> str:
        """The address a host's audit entries name as ``via``: the gateway's side of that host's link."""
        return self.sites.gw_side[host]

    # -- the parts ------------------------------------------------------------------

    def start_platform(self, host: str = "platform") -> None:
        log = open(self.root / f"{host}.log", "ab")  # noqa: SIM115 - the child holds it; closed below
        try:
            proc = self.platforms[host] = self.sites.popen(
                host,
                [sys.executable, "-m", "medbridge", "platform", "serve", "--home", str(self.home.home.root),
                 "--listen", f"{self.sites.address[host]}:{PLATFORM_PORT}", "--workers", "1"],
                stdout=subprocess.PIPE, stderr=log,
            )  # fmt: skip
        finally:
            log.close()
        self.fingerprint = first_line(proc, "listening on", f"the platform at {host}").split("host key ")[1].split()[0]

    def stop_platform(self, sig: int = signal.SIGTERM, host: str = "platform") -> None:
        """Stop a host's platform (SIGKILL: no chance to close anything, as when it crashes or is OOM-killed)."""
        _end(self.platforms.pop(host, None), sig)

    def start_gateway(self) -> None:
        self.gateway = self.sites.popen(
            "gw", [sys.executable, "-m", "medbridge", "gateway", "serve", "--config", str(self.gateway_config)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        first_line(self.gateway, "route prod", "the gateway")

    def stop_gateway(self, sig: int = signal.SIGTERM) -> None:
        _end(self.gateway, sig)
        self.gateway = None

    def start(self) -> Deployment:
        for host in self.hosts:
            self.start_platform(host)
        self.start_gateway()
        return self

    def stop(self) -> None:
        _end(self.gateway)
        self.gateway = None
        for host in list(self.platforms):
            self.stop_platform(host=host)
        self.home.store.close()

    # -- link faults at gw ------------------------------------------------------------

    def reset(self, on: bool = True) -> None:
        """Answer every TCP packet from the compute nodes with a reset (``on``), or stop doing so."""
        dev = self.sites._gw_dev("hpc")
        rule = ["INPUT", "-i", dev, "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"]
        self.sites.exec("gw", "iptables", "-I" if on else "-D", *rule).check_returncode()

    def limit_uploads(self, rate_mbit: float | None) -> None:
        """Cap what the compute nodes send (tc tbf on their side of the link), or lift the cap (None)."""
        dev = self.sites._veth["hpc"]
        if rate_mbit is None:
            self.sites.exec("hpc", "tc", "qdisc", "del", "dev", dev, "root").check_returncode()
            return
        self.sites.exec("hpc", "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit",
                        "burst", "64kb", "latency", "200ms").check_returncode()  # fmt: skip

    # -- jobs at hpc ------------------------------------------------------------------

    def job_command(self, user: str, payload: list[str], *options: str) -> list[str]:
        """``medbridge job run`` at hpc, through the gateway, as ``user``, running ``payload``."""
        return [*self.sites_prefix("hpc"), sys.executable, "-m", "medbridge", "job", "run",
                "--platform", f"{self.sites.gw_hpc_side}:{GATEWAY_PORT}", "--key", str(self.home.keys[user]),
                "--user", user, "--host-key-fingerprint", self.fingerprint, "--no-purge", *options,
                "--", *payload]  # fmt: skip

    def sites_prefix(self, site: str) -> list[str]:
        return ["ip", "netns", "exec", self.sites.ns[site]]

    def job_environment(self, work: Path) -> dict[str, str]:
        """Not the environment of any job this process runs in: its state beside its working folder."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDBRIDGE_", "SLURM_")) and k != "TMPDIR"}
        env["MEDBRIDGE_STATE_DIR"] = str(work)
        return env

    def gateway_bytes(self) -> float:
        """Bytes the gateway has relayed so far, both directions, from its own counters."""
        r = self.sites.exec("gw", sys.executable, "-c", _READ_METRICS, f"http://127.0.0.1:{METRICS_PORT}/metrics")
        return float(r.stdout.strip() or 0)


def _end(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if proc is not None:
        processes.stop(proc, timeout=15, sig=sig)
        if proc.stdout is not None:
            proc.stdout.close()


_READ_METRICS = (
    "import sys, urllib.request\n"
    "text = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()\n"
    "print(sum(float(l.rsplit(' ', 1)[1]) for l in text.splitlines() "
    "if l.startswith('medbridge_gateway_bytes_total{')))\n"
)


def wait_for(check: Any, what: str, timeout: float = 120, proc: subprocess.Popen[Any] | None = None) -> None:
    """Wait until ``check()`` is true (an event, never a fixed time); fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the job ended first (exit {proc.returncode})")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.05)
