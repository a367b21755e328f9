"""Platform hosts: small-file throughput of N platform hosts behind the gateway, as jobs reach them.

Issue 17's target: two platform hosts serve >= 1.8x the small-file throughput of one,
where the machine has the cores.  Each host is ``platform serve`` (one worker) in a
namespace of its own (``platform``, ``platform2``, …); all serve one home (the shared
storage) on one PostgreSQL (a private server) behind the gateway's backend list at
``gw``.  The readers are loader processes (:mod:`medbridge.bench.client`) at ``hpc``
holding a job certificate from ``job run``, ``clients_per_host`` per host, each
reading the whole data set every pass, verified; so the work per client stays the same
as the hosts grow and ``speedup`` = rate(N) / rate(1).  A row names the cores the run
needed (hosts, clients and the gateway) and whether the machine had them: where it did
not, the ratio measures a full machine, not the hosts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncssh

from medbridge.bench import client
from medbridge.bench.io import _cpu_tree, _machine
from medbridge.bench.network import ThreeSites
from medbridge.bench.scale import usable_cores
from medbridge.errors import InvalidInput
from medbridge.platform.storage import add_dataset
from medbridge.testing import netns
from medbridge.testing.deployment import GATEWAY_PORT, Deployment
from medbridge.testing.postgres import PostgresServer, bindir

TARGET = 1.8


@dataclass(frozen=True, kw_only=True)
class Plan:
    hosts: tuple[int, ...] = (1, 2)
    clients_per_host: int = 2
    connections: int = 2  # per client
    window: int = 64
    small_files: int = 2000
    small_kb: int = 100
    repeats: int = 3

    @classmethod
    def quick(cls) -> Plan:
        return cls(small_files=400, repeats=2)

    def check(self) -> None:
        most = len(netns.PLATFORM_HOSTS)
        if not self.hosts or any(not 1 <= n <= most for n in self.hosts):
            raise InvalidInput(f"--hosts: give counts from 1 to {most}")
        why = netns.available()
        if why is not None:
            raise InvalidInput(f"bench hosts runs the hosts in network namespaces: {why}")
        if bindir() is None:
            raise InvalidInput("bench hosts needs PostgreSQL's binaries (Debian package postgresql)")


def run(plan: Plan, progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    plan.check()
    root = Path(tempfile.mkdtemp(prefix="medbridge-bench-hosts-", dir="/var/tmp"))
    rows: list[dict[str, Any]] = []
    try:
        with contextlib.ExitStack() as stack:
            server = stack.enter_context(PostgresServer())
            net = ThreeSites(root, netns.with_hosts(max(plan.hosts)))
            stack.callback(net.close)
            d = Deployment(net.sites, root / "world", server.database())
            stack.callback(d.stop)
            key = _world(d, root, plan, progress)
            for n in plan.hosts:
                _serve(d, d.hosts[:n])
                rows += _measure(d, net, key, n, plan, progress)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    one = next((r for r in rows if r["hosts"] == 1), None)
    for r in rows:
        r["speedup"] = round(r["files_per_s"] / one["files_per_s"], 3) if one and one["files_per_s"] else None
    return {"machine": _machine(), "plan": {**asdict(plan), "hosts": list(plan.hosts)}, "rows": rows,
            "targets": verdicts(rows)}  # fmt: skip


def _world(d: Deployment, root: Path, plan: Plan, say: Callable[[str], None]) -> asyncssh.SSHKey:
    """The shared home's user, its data set and grant; the user's enrolment key."""
    key_path = d.home.add_user("bench")
    src = root / "src-small"
    src.mkdir()
    for i in range(plan.small_files):
        (src / f"f{i:05d}.bin").write_bytes(os.urandom(plan.small_kb << 10))
    say(f"ingesting {plan.small_files} x {plan.small_kb} KiB into the shared home (PostgreSQL)")
    add_dataset(d.home.home, d.home.store, "small", src, "bench", "bench")
    shutil.rmtree(src)
    d.home.grant("bench", "small")
    return asyncssh.read_private_key(str(key_path))


def _serve(d: Deployment, hosts: list[str]) -> None:
    """Exactly ``hosts`` serving, the gateway's route naming only them."""
    for host in list(d.platforms):
        if host not in hosts:
            d.stop_platform(host=host)
    for host in hosts:
        if host not in d.platforms:
            d.start_platform(host)
    d.stop_gateway()
    d.write_route(hosts)
    d.start_gateway()


def _measure(d: Deployment, net: ThreeSites, key: asyncssh.SSHKey, n: int, plan: Plan,
             say: Callable[[str], None]) -> list[dict[str, Any]]:  # fmt: skip
    count = n * plan.clients_per_host
    say(f"{n} host(s), {count} client(s) through the gateway")
    servers = [p.pid for p in d.platforms.values()]
    assert d.gateway is not None
    gateway = d.gateway.pid
    runs: list[tuple[float, int, int, float, float, float]] = []
    with (
        net.job(key, d.fingerprint, net.sites.gw_hpc_side, GATEWAY_PORT, f"bench-hosts-{n}") as (ep, _cfg),
        client.clients(
            ep, count, connections=plan.connections, window=plan.window, data=("small",), prefix=net.prefix("hpc")
        ) as running,  # fmt: skip
    ):
        for rep in range(plan.repeats):
            hosts0, gw0 = sum(_cpu_tree(p) for p in servers), _cpu_tree(gateway)
            passes = client.together(running, "small")
            hosts_cpu, gw_cpu = sum(_cpu_tree(p) for p in servers) - hosts0, _cpu_tree(gateway) - gw0
            wall = max(p.end for p in passes) - min(p.start for p in passes)
            files, nbytes = sum(p.files for p in passes), sum(p.nbytes for p in passes)
            runs.append((wall, files, nbytes, hosts_cpu, gw_cpu, sum(p.cpu_s for p in passes)))
            say(f"  run {rep + 1}: {files / wall:,.0f} files/s, {nbytes / wall / 1e6:,.0f} MB/s")
    wall = statistics.median(r[0] for r in runs)
    cpu = {name: round(statistics.median(r[i] for r in runs), 3) for i, name in ((3, "hosts"), (4, "gateway"),
                                                                                 (5, "clients"))}  # fmt: skip
    needed = n + count + 1
    return [{
        "hosts": n, "clients": count, "data": "small",
        "files_per_s": round(runs[0][1] / wall, 1), "mb_per_s": round(runs[0][2] / wall / 1e6, 1),
        "speedup": None, "cpu_s": cpu, "cores_busy": round(sum(cpu.values()) / wall, 2),
        "cores_needed": needed, "cores_free": needed <= usable_cores(), "repeats": len(runs),
    }]  # fmt: skip


def verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Two hosts against one; ``met`` is None where the machine lacked the cores (the run then says nothing)."""
    two = next((r for r in rows if r["hosts"] == 2), None)
    verdict: dict[str, Any] = {"target": f"2 hosts >= {TARGET}x the small-file throughput of 1",
                               "measured": two["speedup"] if two else None, "met": None}  # fmt: skip
    if two is not None and two["speedup"] is not None:
        if two["cores_free"]:
            verdict["met"] = two["speedup"] >= TARGET
        else:
            verdict["why"] = (f"not measurable here: the run needs {two['cores_needed']} cores (2 hosts, "
                              f"{two['clients']} clients, the gateway), the machine has {usable_cores()}")  # fmt: skip
    return [verdict]


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(result["rows"], key=lambda r: r["hosts"])
    fig, ax = plt.subplots(figsize=(4.6, 3.8))
    ns = [r["hosts"] for r in rows]
    ax.plot(ns, [r["files_per_s"] for r in rows], "-", color="#4c72b0")
    for free in (True, False):
        pts = [(r["hosts"], r["files_per_s"]) for r in rows if r["cores_free"] is free]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o", color="#4c72b0", fillstyle="full" if free else "none",
                    label="measured" if free else "measured, cores not free")  # fmt: skip
    one = next((r["files_per_s"] for r in rows if r["hosts"] == 1), None)
    if one is not None:
        ax.plot(ns, [one * n for n in ns], "--", color="#999999", label="N x one host")
        ax.plot([2], [one * TARGET], "_", color="#c44e52", markersize=24, label=f"target: {TARGET}x one host")
    ax.set_title("small files: N platform hosts behind the gateway")
    ax.set_xticks(ns)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("platform hosts")
    ax.set_ylabel("files/s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
