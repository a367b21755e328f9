"""Several platform hosts behind the gateway: one home on shared storage, one PostgreSQL, one CA.

    hpc: ``job run``  →  gw: ``gateway serve`` (backends platform:2222, platform2:2222, …)  →  each platform host:
                                                                                             ``platform serve``

Every host serves the same home: its keys (one host key, so a job's pinned fingerprint
holds whichever host it reaches; one user CA, so a certificate issued by one host is
accepted by all), its storage (datasets, manifests, results, the limits' lock files) and
its ``platform.toml``, whose ``database_url`` names the one PostgreSQL.  The home here is a
local folder that every namespace sees, standing in for the site's shared file system;
PostgreSQL is a private server reached on its Unix socket, which every namespace sees too.
Hosts are processes in their places of :class:`~medbridge.testing.netns.Sites` and can be
stopped, killed and started again; the gateway holds them as one route's backend list.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medbridge import processes
from medbridge.bench.network import first_line
from medbridge.testing import RunningPlatform
from medbridge.testing.netns import PLATFORM_HOSTS, Sites

PLATFORM_PORT, GATEWAY_PORT = 2222, 2201


class PlatformHosts:
    """``platform serve`` on every platform place of ``sites``, one home, a gateway at gw in front of them all."""

    def __init__(self, sites: Sites, root: Path, database_url: str, **settings: Any):
        if not database_url.startswith("postgresql"):
            raise ValueError("several platform hosts share one PostgreSQL (SQLite is one host's)")
        self.sites = sites
        self.root = root
        self.places = [p for p in PLATFORM_HOSTS if p in sites.ns]
        settings.setdefault("trusted_proxies", [f"{sites.gw_side[p]}/32" for p in self.places])
        #: The shared home: users, datasets and grants are added through it; its store reads the audit.
        self.home = RunningPlatform(root / "shared", database_url, **settings)
        self.servers: dict[str, subprocess.Popen[str]] = {}
        self.gateway: subprocess.Popen[str] | None = None
        self.fingerprint = self.home.fingerprint
        self.gateway_config = root / "gateway.toml"
        backends = ", ".join(f'"{sites.address[p]}:{PLATFORM_PORT}"' for p in self.places)
        self.gateway_config.write_text(
            f'[[route]]\nname = "prod"\nlisten = "{sites.gw_hpc_side}:{GATEWAY_PORT}"\nbackends = [{backends}]\n'
            f'allow = ["{sites.node}/32"]\nproxy_protocol = true\n'
        )

    @property
    def gateway_address(self) -> str:
        return f"{self.sites.gw_hpc_side}:{GATEWAY_PORT}"

    def prefix(self, place: str) -> list[str]:
        return ["ip", "netns", "exec", self.sites.ns[place]]

    def via(self, place: str) -> str:
        """The address a host's audit names as ``via``: the gateway's side of that host's link."""
        return self.sites.gw_side[place]

    # -- the parts --------------------------------------------------------------------

    def start_host(self, place: str, workers: int = 1) -> None:
        log = self.root / f"{place}.log"
        with open(log, "ab") as err:
            proc = subprocess.Popen([
                *self.prefix(place), sys.executable, "-m", "medbridge", "platform", "serve",
                "--home", str(self.home.home.root), "--listen", f"{self.sites.address[place]}:{PLATFORM_PORT}",
                "--workers", str(workers),
            ], stdout=subprocess.PIPE, stderr=err, text=True)  # fmt: skip
        self.servers[place] = proc
        first_line(proc, "listening on", f"the platform at {place}", log)

    def stop_host(self, place: str, sig: int = signal.SIGTERM) -> None:
        """Stop a host's platform (SIGKILL: it dies as a crashed or OOM-killed process does)."""
        proc = self.servers.pop(place, None)
        if proc is not None:
            processes.stop(proc, timeout=15, sig=sig)
            if proc.stdout is not None:
                proc.stdout.close()

    def start_gateway(self) -> None:
        log = self.root / "gateway.log"
        with open(log, "ab") as err:
            self.gateway = gateway = subprocess.Popen([
                *self.prefix("gw"), sys.executable, "-m", "medbridge", "gateway", "serve",
                "--config", str(self.gateway_config),
            ], stdout=subprocess.PIPE, stderr=err, text=True)  # fmt: skip
        first_line(gateway, "route prod", "the gateway", log)

    def start(self) -> PlatformHosts:
        try:
            for place in self.places:
                self.start_host(place)
            self.start_gateway()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.gateway is not None:
            processes.stop(self.gateway, timeout=15)
            if self.gateway.stdout is not None:
                self.gateway.stdout.close()
            self.gateway = None
        for place in list(self.servers):
            self.stop_host(place)
        self.home.store.close()

    # -- jobs at hpc ------------------------------------------------------------------

    def job_command(self, user: str, payload: Sequence[str], *options: str) -> list[str]:
        """``medbridge job run`` at hpc, through the gateway, as ``user``, running ``payload``."""
        return [*self.prefix("hpc"), sys.executable, "-m", "medbridge", "job", "run",
                "--platform", self.gateway_address, "--key", str(self.home.keys[user]), "--user", user,
                "--host-key-fingerprint", self.fingerprint, "--no-purge", *options, "--", *payload]  # fmt: skip

    def job_environment(self, work: Path) -> dict[str, str]:
        """Not the environment of any job this process runs in: no Slurm, its state beside its working folder."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDBRIDGE_", "SLURM_")) and k != "TMPDIR"}
        env["MEDBRIDGE_STATE_DIR"] = str(work)
        return env
