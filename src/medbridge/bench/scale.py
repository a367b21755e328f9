"""Worker scaling: N platform processes serving N loader processes on one machine.

Issue 6's last targets are aggregates: throughput that grows >= 0.8xN with N workers
where N cores are free, and on a 16-core GPU host >= 8,000 small samples/s from shards
and >= 1.1 GB/s of volumes, loader and server on the same machine.  For each N this
starts ``platform serve --workers N`` and N client processes (each with a loader of its
own: connections, verification against the manifest, nothing shared), lets every
client finish its connections and manifests, then starts them together.  Each client
reads the whole data set each time, so the work per client stays the same as N grows
and ``scaling`` = rate(N) / (N x rate(1)).  A row says whether the machine had the
cores it needs (server N + clients), and how many cores the run kept busy, so a
flattening curve can be told apart from a full machine.

The clients are :mod:`medbridge.bench.client` processes.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medbridge.bench import client
from medbridge.bench.client import DATA
from medbridge.bench.io import Plan as IOPlan
from medbridge.bench.io import World, _cpu_tree, _machine
from medbridge.bench.network import job
from medbridge.errors import InvalidInput

#: What the issue asks of a 16-core GPU host, aggregate: one H100's ResNet-50 inference
#: rate in samples from shards, and 90% of the original platform's 10 Gbit/s link.
TARGETS = {"shards": ("files_per_s", 8000.0), "large": ("mb_per_s", 1100.0)}
SCALING_TARGET = 0.8


def usable_cores() -> int:
    """The cores this process may run on (its affinity), not all the host has: a container's limit counts."""
    return len(os.sched_getaffinity(0)) or 1


def default_workers(cores: int | None = None) -> tuple[int, ...]:
    """1, 2, 4, ... up to half the cores: N server and N client processes each get a core."""
    half = max(1, (cores or usable_cores()) // 2)
    out = [1]
    while out[-1] * 2 <= half:
        out.append(out[-1] * 2)
    if out[-1] != half:
        out.append(half)
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class Plan:
    workers: tuple[int, ...] = default_workers()
    clients_per_worker: int = 1
    connections: int = 2  # per client
    window: int = 64
    small_files: int = 2000
    large_files: int = 4
    large_mb: int = 64
    repeats: int = 3
    data: tuple[str, ...] = DATA

    @classmethod
    def quick(cls) -> Plan:
        return cls(workers=(1, 2), small_files=400, large_files=2, large_mb=32, repeats=2)

    def check(self) -> None:
        if not self.workers or any(n < 1 for n in self.workers):
            raise InvalidInput("--workers: give one or more counts of at least 1")
        unknown = set(self.data) - set(DATA)
        if unknown or not self.data:
            raise InvalidInput(f"--data: choose from {', '.join(DATA)}")


def run(plan: Plan, progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    plan.check()
    root = Path(tempfile.mkdtemp(prefix="medbridge-bench-scale-"))
    io_plan = IOPlan(small_files=plan.small_files, large_files=plan.large_files, large_mb=plan.large_mb,
                     server_workers=plan.workers[0], paths=("native",))  # fmt: skip
    rows: list[dict[str, Any]] = []
    try:
        world = World(root, io_plan, progress)  # stops what it started if it fails
        try:
            for i, n in enumerate(plan.workers):
                if i:  # the world started with the first count
                    world.start_server(n)
                rows += _measure(world, n, plan, progress)
        finally:
            world.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"machine": _machine(), "plan": {**asdict(plan), "workers": list(plan.workers)},
            "rows": _with_scaling(rows), "targets": verdicts(rows)}  # fmt: skip


def _measure(world: World, n: int, plan: Plan, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """One row per data kind for ``n`` workers: medians over the repeats of the clients' passes together."""
    count = n * plan.clients_per_worker
    say(f"{n} worker(s), {count} client(s)")
    runs: dict[str, list[tuple[float, int, int, float, float]]] = {}
    with (
        job(world.key, world.fingerprint, world.port) as (ep, _cfg),
        client.clients(ep, count, connections=plan.connections, window=plan.window, data=plan.data) as running,
    ):
        for rep in range(plan.repeats):
            for data in plan.data:
                server0 = _cpu_tree(world.server_pid)
                passes = client.together(running, data)
                server = _cpu_tree(world.server_pid) - server0
                wall = max(p.end for p in passes) - min(p.start for p in passes)
                files, nbytes = sum(p.files for p in passes), sum(p.nbytes for p in passes)
                runs.setdefault(data, []).append((wall, files, nbytes, server, sum(p.cpu_s for p in passes)))
                say(f"  {data}, run {rep + 1}: {files / wall:,.0f} files/s, {nbytes / wall / 1e6:,.0f} MB/s")
    rows = []
    for data, measured in runs.items():
        wall = statistics.median(r[0] for r in measured)
        server_cpu = statistics.median(r[3] for r in measured)
        client_cpu = statistics.median(r[4] for r in measured)
        rows.append({
            "workers": n, "clients": count, "data": data,
            "files_per_s": round(measured[0][1] / wall, 1), "mb_per_s": round(measured[0][2] / wall / 1e6, 1),
            "bytes": measured[0][2],
            "scaling": None,
            "cpu_s": {"server": round(server_cpu, 3), "clients": round(client_cpu, 3)},
            "cores_busy": round((server_cpu + client_cpu) / wall, 2),
            "cores_free": n + count <= usable_cores(),
            "repeats": len(measured),
        })  # fmt: skip
    return rows


def _with_scaling(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """rate(N) / (N x rate(1)) for each data kind, where a one-worker row was measured."""
    base = {r["data"]: r for r in rows if r["workers"] == 1}
    for r in rows:
        one = base.get(r["data"])
        if one is not None and one["files_per_s"] > 0:
            r["scaling"] = round(r["files_per_s"] / (r["workers"] * one["files_per_s"]), 3)
    return rows


def verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target against the best row measured for it; ``met`` is None where nothing could say."""
    out = []
    for data, (key, goal) in TARGETS.items():
        sel = [r for r in rows if r["data"] == data]
        best = max(sel, key=lambda r: r[key], default=None)
        out.append({
            "target": f"{data} {key} >= {goal:g}", "measured": best[key] if best else None,
            "workers": best["workers"] if best else None, "met": best[key] >= goal if best else None,
        })  # fmt: skip
    free = [r for r in rows if r["workers"] > 1 and r["cores_free"] and r["scaling"] is not None]
    worst = min(free, key=lambda r: r["scaling"], default=None)
    out.append({
        "target": f"scaling >= {SCALING_TARGET} with N workers on N free cores",
        "measured": worst["scaling"] if worst else None,
        "workers": worst["workers"] if worst else None,
        "met": worst["scaling"] >= SCALING_TARGET if worst else None,
    })  # fmt: skip
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    kinds = [d for d in DATA if any(r["data"] == d for r in rows)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.8), squeeze=False)
    for ax, data in zip(axes[0], kinds, strict=True):
        sel = sorted((r for r in rows if r["data"] == data), key=lambda r: r["workers"])
        key = "mb_per_s" if data == "large" else "files_per_s"
        ns = [r["workers"] for r in sel]
        ax.plot(ns, [r[key] for r in sel], "-", color="#4c72b0")
        for free in (True, False):
            pts = [(r["workers"], r[key]) for r in sel if r["cores_free"] is free]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o", color="#4c72b0", fillstyle="full" if free else "none",
                        label="measured" if free else "measured, cores not free")  # fmt: skip
        one = next((r[key] for r in sel if r["workers"] == 1), None)
        if one is not None:
            ax.plot(ns, [one * n for n in ns], "--", color="#999999", label="N x one worker")
        if data in TARGETS:
            ax.axhline(TARGETS[data][1], color="#c44e52", linestyle=":", label="GPU-host target")
        ax.set_title(f"{data}: N workers + N clients")
        ax.set_xticks(ns)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("N")
        ax.set_ylabel("MB/s" if data == "large" else "samples/s")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
