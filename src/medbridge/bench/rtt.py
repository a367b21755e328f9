"""Round-trip times between sites, at TCP level (handshake) and at SFTP level (a stat round trip).

TCP level times ``connect()``: the kernel path to the first process listening (a
gateway or relay answers the handshake itself).  SFTP level times ``stat`` on one
open session: the full path to the platform and back through every relay, as a job
sees it.  Credentials for SFTP come from the job environment (``medbridge job run``).
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from medbridge.compute.session import Endpoint, connect
from medbridge.errors import InvalidInput, PlatformUnavailable
from medbridge.net import parse_address


@dataclass(frozen=True)
class Route:
    name: str
    host: str
    port: int


def parse_route(text: str) -> Route:
    name, sep, address = text.partition("=")
    if not sep or not name:
        raise InvalidInput(f"--route {text!r}: use NAME=HOST:PORT")
    return Route(name, *parse_address(address, f"--route {text!r}"))


def tcp_samples(route: Route, samples: int, timeout: float = 5.0) -> list[float]:
    """Seconds per TCP handshake."""
    out = []
    for _ in range(samples):
        start = time.perf_counter()
        try:
            with socket.create_connection((route.host, route.port), timeout=timeout):
                out.append(time.perf_counter() - start)
        except OSError as exc:
            raise PlatformUnavailable(
                f"route {route.name}: cannot connect to {route.host}:{route.port}: {exc}"
            ) from exc
    return out


async def sftp_samples(route: Route, ep: Endpoint, samples: int, warmup: int = 3) -> list[float]:
    """Seconds per SFTP ``stat`` round trip on one session through ``route``."""
    conn = await connect(ep, route.host, route.port)
    async with conn:
        out = await stat_round_trips(conn, samples, warmup)
    return out


async def stat_round_trips(conn: asyncssh.SSHClientConnection, samples: int, warmup: int) -> list[float]:
    """Seconds per SFTP ``stat`` of ``/`` on a new SFTP session of ``conn``, after ``warmup`` untimed ones."""
    sftp = await conn.start_sftp_client()
    out = []
    for i in range(warmup + samples):
        start = time.perf_counter()
        await sftp.stat("/")
        if i >= warmup:
            out.append(time.perf_counter() - start)
    return out


def summarise(route: Route, level: str, seconds: Sequence[float]) -> dict[str, Any]:
    ms = [s * 1000 for s in seconds]
    return {
        "name": route.name,
        "level": level,
        "min_ms": round(min(ms), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "median_ms": round(statistics.median(ms), 3),
        "max_ms": round(max(ms), 3),
        "samples": len(ms),
    }


def measure(routes: Sequence[Route], levels: Sequence[str], samples: int,
            endpoint: Endpoint | None) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    for route in routes:
        if "tcp" in levels:
            rows.append(summarise(route, "tcp", tcp_samples(route, samples)))
        if "sftp" in levels:
            if endpoint is None:
                raise InvalidInput("SFTP level needs the job environment: run it inside 'medbridge job run'")
            rows.append(summarise(route, "sftp", asyncio.run(sftp_samples(route, endpoint, samples))))
    return rows


def plot(rows: Sequence[Mapping[str, Any]], path: Path, title: str = "round-trip time between sites") -> None:
    """Bars of the mean with min-max whiskers, one per route and level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['name']}\n({r['level']})" for r in rows]
    means = [r["mean_ms"] for r in rows]
    low = [r["mean_ms"] - r["min_ms"] for r in rows]
    high = [r["max_ms"] - r["mean_ms"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(rows)), 3.6))
    ax.bar(labels, means, yerr=[low, high], capsize=6, color=["#4c72b0" if r["level"] == "tcp" else "#dd8452"
                                                               for r in rows])  # fmt: skip
    for i, r in enumerate(rows):
        ax.annotate(f"{r['mean_ms']:.2f}", (i, r["mean_ms"]), textcoords="offset points", xytext=(0, 4),
                    ha="center", fontsize=8)  # fmt: skip
    ax.set_ylabel("milliseconds (mean, min-max)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
