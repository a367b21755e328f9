"""``medbridge bench``: the experiments."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import click

from medbridge.cli import output


@click.group()
def bench() -> None:
    """Measure: round trips between sites."""


@bench.command("rtt")
@click.option("--route", "routes", multiple=True, required=True, help="NAME=HOST:PORT to measure (repeatable).")
@click.option("--samples", type=click.IntRange(1, 10000), default=20, show_default=True)
@click.option(
    "--level",
    type=click.Choice(["tcp", "sftp", "both"]),
    default=None,
    help="Default: both inside 'job run', else tcp.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Write a bar chart (PNG).")
def bench_rtt(routes: Sequence[str], samples: int, level: str | None, as_json: bool, plot: Path | None) -> None:
    """Min / mean / max round-trip time per route, at TCP and SFTP level."""
    from medbridge.bench import rtt
    from medbridge.compute.session import endpoint_from_job

    in_job = "MEDBRIDGE_SSH_CONFIG" in os.environ
    levels = {"tcp": ["tcp"], "sftp": ["sftp"], "both": ["tcp", "sftp"], None: ["tcp", "sftp"] if in_job else ["tcp"]}
    chosen = levels[level]
    endpoint = endpoint_from_job(os.environ) if "sftp" in chosen else None
    rows = rtt.measure([rtt.parse_route(r) for r in routes], chosen, samples, endpoint)
    if plot is not None:
        rtt.plot(rows, plot)
    if as_json:
        output.emit_json({"routes": rows})
        return
    output.table("round-trip time (ms)", ["route", "level", "min", "mean", "median", "max", "samples"],
                 [(r["name"], r["level"], r["min_ms"], r["mean_ms"], r["median_ms"], r["max_ms"], r["samples"])
                  for r in rows])  # fmt: skip


@bench.command("relay")
@click.option("--mb", type=click.IntRange(16, 100_000), default=1024, show_default=True, help="MB per transfer.")
@click.option("--repeats", type=click.IntRange(1, 20), default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def bench_relay(mb: int, repeats: int, as_json: bool) -> None:
    """CPU seconds per GB: the gateway's splice relay against a plain asyncio relay, same run."""
    from medbridge.bench import relay

    result = relay.run(mb, repeats, progress=None if as_json else lambda m: output.err.print(m, highlight=False))
    if as_json:
        output.emit_json(result)
        return
    output.table(f"relay cost, {mb} MB x {repeats} (loopback, medians)", ["relay", "MB/s", "CPU-s per GB"],
                 [(r["relay"], r["mb_per_s"], r["cpu_s_per_gb"]) for r in result["rows"]])  # fmt: skip
