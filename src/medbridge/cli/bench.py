"""``medbridge bench``: the experiments."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import click

from medbridge.cli import output


@click.group()
def bench() -> None:
    """Measure: round trips, relay cost, reading by every path, worker scaling."""


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


@bench.command("io")
@click.option("--quick", is_flag=True, help="Smaller data and fewer repeats (about two minutes here).")
@click.option(
    "--rtt-ms", "rtts", default="0,5", show_default=True, help="Emulated round trips to add, comma-separated."
)
@click.option("--repeats", type=click.IntRange(1, 20), default=None)
@click.option(
    "--server-workers", type=click.IntRange(1, 256), default=None, help="Platform processes (default: cores)."
)
@click.option("--small-files", type=click.IntRange(1, 1_000_000), default=None, help="Number of ~100 KiB files.")
@click.option("--large-files", type=click.IntRange(1, 1000), default=None, help="Number of large volumes.")
@click.option("--large-mb", type=click.IntRange(1, 4096), default=None, help="Size of each large volume, MiB.")
@click.option(
    "--paths",
    "paths",
    default=None,
    help="Paths to measure, comma-separated (default: all): "
    "local, sshfs-default, sshfs-tuned, native, native-shards, native-fsspec, openssh-sftp-server.",
)
@click.option("--network", type=click.Choice(["auto", "loopback", "sites"]), default="auto", show_default=True,
              help="sites: readers at hpc, gateway at gw, servers at platform (network namespaces, root); "
              "loopback: all on 127.0.0.1; auto: sites where namespaces can be made.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Write a chart (PNG).")
def bench_io(quick: bool, rtts: str, repeats: int | None, server_workers: int | None, small_files: int | None,
             large_files: int | None, large_mb: int | None, paths: str | None, network: str, as_json: bool,
             plot: Path | None) -> None:  # fmt: skip
    """Read the same data by every path in one run: local disk, sshfs default/tuned, native loader, shards."""
    import dataclasses

    from medbridge.bench import io
    from medbridge.errors import InvalidInput

    plan = io.Plan.quick() if quick else io.Plan()
    try:
        rtt_values = tuple(float(x) for x in rtts.split(","))
    except ValueError as exc:
        raise InvalidInput(f"--rtt-ms {rtts!r}: use numbers separated by commas") from exc
    changes: dict[str, object] = {"rtts_ms": rtt_values}
    if paths is not None:
        chosen = tuple(x.strip() for x in paths.split(",") if x.strip())
        unknown = sorted(set(chosen) - set(io.PATHS))
        if unknown or not chosen:
            raise InvalidInput(f"--paths {paths!r}: choose from {', '.join(io.PATHS)}")
        changes["paths"] = chosen
    if repeats:
        changes["repeats"] = repeats
    for key, value in (("server_workers", server_workers), ("small_files", small_files),
                       ("large_files", large_files), ("large_mb", large_mb)):  # fmt: skip
        if value:
            changes[key] = value
    plan = dataclasses.replace(plan, **changes)  # type: ignore[arg-type]
    say = (lambda m: None) if as_json else (lambda m: output.err.print(m, highlight=False))
    result = io.run(plan, progress=say, network=network)
    if plot is not None:
        io.plot(result, plot)
    if as_json:
        output.emit_json(result)
        return
    columns = ["path", "data", "rtt ms", "files/s", "MB/s", "x local", "CPU-s client/server/relay"]
    rows = [
        (r["path"], r["data"], r["rtt_ms"], r["files_per_s"], r["mb_per_s"], r["ratio_to_local"],
         "/".join(str(r["cpu_s"][k]) for k in io.CPU_PARTS))
        for r in result["rows"]
    ]  # fmt: skip
    output.table(f"bench io (medians, {result['network']})", columns, rows)


def _counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1 or max(values) > 256:
        from medbridge.errors import InvalidInput

        raise InvalidInput(f"--workers {text!r}: use counts from 1 to 256 separated by commas, such as 1,2,4,8")
    return values


@bench.command("scale")
@click.option("--quick", is_flag=True, help="Workers 1,2 and smaller data (about a minute here).")
@click.option("--workers", "workers", default=None, help="Worker counts N to measure, comma-separated "
              "(default: 1, 2, 4, ... up to half the cores).")  # fmt: skip
@click.option("--clients-per-worker", type=click.IntRange(1, 64), default=None, help="Loader processes per worker.")
@click.option("--connections", type=click.IntRange(1, 64), default=None, help="SSH connections per loader.")
@click.option(
    "--data", "data", default=None, help="What to read, comma-separated: shards, small, large (default: all)."
)
@click.option("--repeats", type=click.IntRange(1, 20), default=None)
@click.option("--small-files", type=click.IntRange(1, 1_000_000), default=None, help="Number of ~100 KiB files.")
@click.option("--large-files", type=click.IntRange(1, 1000), default=None, help="Number of large volumes.")
@click.option("--large-mb", type=click.IntRange(1, 4096), default=None, help="Size of each large volume, MiB.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Write a chart (PNG).")
def bench_scale(quick: bool, workers: str | None, clients_per_worker: int | None, connections: int | None,
                data: str | None, repeats: int | None, small_files: int | None, large_files: int | None,
                large_mb: int | None, as_json: bool, plot: Path | None) -> None:  # fmt: skip
    """Aggregate throughput of N platform workers serving N loader processes on this machine."""
    import dataclasses

    from medbridge.bench import scale

    plan = scale.Plan.quick() if quick else scale.Plan()
    changes: dict[str, object] = {}
    if workers is not None:
        changes["workers"] = _counts(workers)
    if data is not None:
        changes["data"] = tuple(x.strip() for x in data.split(",") if x.strip())
    for key, value in (("clients_per_worker", clients_per_worker), ("connections", connections),
                       ("repeats", repeats), ("small_files", small_files), ("large_files", large_files),
                       ("large_mb", large_mb)):  # fmt: skip
        if value:
            changes[key] = value
    plan = dataclasses.replace(plan, **changes)  # type: ignore[arg-type]
    result = scale.run(plan, progress=(lambda m: None) if as_json else (lambda m: output.err.print(m, highlight=False)))
    if plot is not None:
        scale.plot(result, plot)
    if as_json:
        output.emit_json(result)
        return
    columns = ["N", "clients", "data", "files/s", "MB/s", "scaling", "CPU-s srv/cli", "busy", "free"]
    rows = [
        (r["workers"], r["clients"], r["data"], r["files_per_s"], r["mb_per_s"], r["scaling"],
         f"{r['cpu_s']['server']}/{r['cpu_s']['clients']}", r["cores_busy"], "yes" if r["cores_free"] else "no")
        for r in result["rows"]
    ]  # fmt: skip
    output.table("bench scale (medians, loopback)", columns, rows)
    output.table("against the targets", ["target", "measured", "workers", "met"],
                 [(t["target"], t["measured"], t["workers"], {True: "yes", False: "no", None: "-"}[t["met"]])
                  for t in result["targets"]])  # fmt: skip
