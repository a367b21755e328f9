"""``medbridge bench``: the experiments."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import click

from medbridge.cli import output
from medbridge.cli.types import NEW_FOLDER, PLOT, Seconds

_Plan = TypeVar("_Plan")


@click.group()
@click.pass_context
def bench(ctx: click.Context) -> None:
    """Measure: round trips, relay cost, reading by every path, worker scaling, outages, the original experiments."""
    # A benchmark stopped by SIGTERM (a batch system's time limit, kill) must still stop the servers, namespaces
    # and files it made: raised as an interrupt, the SIGTERM runs every cleanup on the way out (exit 130).
    if threading.current_thread() is threading.main_thread():
        before = signal.signal(signal.SIGTERM, _interrupted)
        ctx.call_on_close(lambda: signal.signal(signal.SIGTERM, before))


def _interrupted(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _say(as_json: bool) -> Callable[[str], None]:
    return (lambda m: None) if as_json else (lambda m: output.err.print(m, highlight=False))


def _experiments() -> None:
    """A clear error where torch or MONAI is missing (the experiments extra)."""
    from medbridge.bench.device import missing
    from medbridge.errors import MedbridgeError

    why = missing()
    if why is not None:
        raise MedbridgeError(f"the experiments need torch and MONAI: {why}")


def _items(text: str | None, what: str) -> tuple[str, ...]:
    from medbridge.errors import InvalidInput

    items = tuple(x.strip() for x in (text or "").split(",") if x.strip())
    if text is not None and not items:
        raise InvalidInput(f"{what} {text!r}: a comma-separated list")
    return items


@bench.command("rtt")
@click.option("--route", "routes", multiple=True, help="NAME=HOST:PORT to measure (repeatable).")
@click.option("--sites", is_flag=True, help="Build the original's four places as network namespaces (root) "
              "and measure each pair at TCP and SFTP level.")  # fmt: skip
@click.option("--pairs", default=None, help="With --sites: A-B pairs, comma-separated (default: hpc-exp, "
              "hpc-platform, campus-exp; places: hpc, campus, platform, exp).")  # fmt: skip
@click.option("--link-delay", "link_delays", multiple=True, help="With --sites: PLACE=MS one-way delay of a "
              "place's link (default: hpc 0.5, platform 0.5, exp 1, campus 3).")  # fmt: skip
@click.option("--samples", type=click.IntRange(1, 10000), default=20, show_default=True)
@click.option(
    "--level",
    type=click.Choice(["tcp", "sftp", "both"]),
    default=None,
    help="Default: both inside 'job run', else tcp.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--plot", type=PLOT, default=None, help="Write a bar chart (PNG).")
def bench_rtt(routes: Sequence[str], sites: bool, pairs: str | None, link_delays: Sequence[str], samples: int,
              level: str | None, as_json: bool, plot: Path | None) -> None:  # fmt: skip
    """Min / mean / max round-trip time per route (or, with --sites, per pair of places), at TCP and SFTP level."""
    from medbridge.bench import rtt
    from medbridge.compute.session import endpoint_from_job
    from medbridge.errors import InvalidInput

    if sites:
        if routes:
            raise InvalidInput("--sites measures the places it builds: leave out --route")
        from medbridge.bench import sites as places

        chosen_pairs = places.parse_pairs(pairs) if pairs else places.PAIRS
        result = places.run(chosen_pairs, samples, places.parse_delays(link_delays), _say(as_json))
        if plot is not None:
            places.plot(result, plot)
        if as_json:
            output.emit_json(result)
            return
        output.table("round-trip time between places (ms)",
                     ["pair", "level", "links add", "min", "mean", "median", "max", "samples"],
                     [(r["name"], r["level"], r["emulated_ms"], r["min_ms"], r["mean_ms"], r["median_ms"], r["max_ms"],
                       r["samples"]) for r in result["rows"]])  # fmt: skip
        return
    if not routes:
        raise InvalidInput("give --route NAME=HOST:PORT (repeatable), or --sites")
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
@click.option("--plot", type=PLOT, default=None, help="Write a chart (PNG).")
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


@bench.command("outage")
@click.option("--path", "read_path", type=click.Choice(["mount", "native"]), default="mount", show_default=True,
              help="How the job reads: the sshfs mount, or the native loader.")  # fmt: skip
@click.option("--cut-at", type=Seconds(), default=None, help="Seconds into the job to cut the link "
              "[default: 500; --quick 20].")  # fmt: skip
@click.option("--cut-for", type=Seconds(min_open=True), default=None,
              help="Seconds the link stays cut [default: 300; --quick 30].")  # fmt: skip
@click.option("--volumes", type=click.IntRange(1, 10_000), default=None,
              help="Chest CT volumes (default: enough that the job runs well past the cut).")  # fmt: skip
@click.option("--tolerance", type=Seconds(min_open=True), default=None,
              help="The platform's outage tolerance, seconds (default: its default).")  # fmt: skip
@click.option("--quick", is_flag=True, help="A 30 s cut 20 s in, fewer volumes (a few minutes here).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--plot", type=PLOT, default=None, help="Write the timeline, cut shaded (PNG).")
@click.option("--keep", type=NEW_FOLDER, default=None,
              help="Keep the run's folder here (a new folder): logs, masks, TCP state every 10 s.")  # fmt: skip
def bench_outage(read_path: str, cut_at: float | None, cut_for: float | None, volumes: int | None,
                 tolerance: float | None, quick: bool, as_json: bool, plot: Path | None,
                 keep: Path | None) -> None:  # fmt: skip
    """The original's figure: a lung-segmentation job on the three sites, its link cut at gw mid-inference.

    Reports whether the job completed, whether every mask matches an uncut run (SHA-256),
    whether every volume the job read was the dataset's (SHA-256), the longest the job
    waited for a volume (stall), and bytes per second through the gateway over time.
    Exits 0 when the job completed with identical outputs and reads, 1 otherwise.
    """
    import dataclasses

    from medbridge.bench import outage

    plan = outage.Plan.quick(read_path) if quick else outage.Plan(path=read_path)
    changes = {k: v for k, v in (("cut_at", cut_at), ("cut_for", cut_for), ("volumes", volumes),
                                 ("tolerance", tolerance)) if v is not None}  # fmt: skip
    plan = dataclasses.replace(plan, **changes)  # type: ignore[arg-type]
    result = outage.run(plan, progress=None if as_json else (lambda m: output.err.print(m, highlight=False)),
                        keep=keep)  # fmt: skip
    if plot is not None:
        outage.plot(result, plot)
    if as_json:
        output.emit_json(result)
    else:
        output.table(f"bench outage ({result['path']}, three sites)", ["measure", "value"], [
            ("completed", "yes" if result["completed"] else "NO"),
            ("outputs match an uncut run", "yes" if result["outputs_match"] else "NO"),
            ("cut", f"{result['cut_s']} s at {result['cut_at_s']} s"),
            ("longest wait for a volume (stall)", f"{result['stall_s']} s"),
            ("first volume after the link returned", f"{result['first_read_after_cut_s']} s"),
            ("volumes", f"{result['volumes_read']}/{result['volumes']}"),
            ("job", f"{result['job_seconds']} s, exit {result['exit_code']}"),
            *((("volumes read with wrong bytes", ", ".join(result["reads_differ"][:5])),)
              if result["reads_differ"] else ()),
            *((f"masks {k} (of {result['outputs']['reference_volumes']})",
               ", ".join(v[:5]) + (" …" if len(v) > 5 else ""))
              for k, v in result["outputs"].items() if k != "reference_volumes" and v),
        ])  # fmt: skip
        if result["job_said"]:
            output.err.print(result["job_said"], highlight=False, markup=False)
    if not outage.whole(result):
        raise click.exceptions.Exit(1)


def _given(plan: _Plan, **options: object) -> _Plan:
    """``plan`` with the options the user gave (None: the plan's own)."""
    import dataclasses

    return dataclasses.replace(plan, **{k: v for k, v in options.items() if v is not None})  # type: ignore[type-var]


def _measured(module: Any, plan: object, as_json: bool, plot: Path | None) -> dict[str, Any] | None:
    """Run a scaling benchmark (``module.run``, ``module.plot``): its result to print, or None once printed as JSON."""
    result: dict[str, Any] = module.run(plan, progress=_say(as_json))
    if plot is not None:
        module.plot(result, plot)
    if as_json:
        output.emit_json(result)
        return None
    return result


def _counts(text: str, option: str = "--workers") -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1 or max(values) > 256:
        from medbridge.errors import InvalidInput

        raise InvalidInput(f"{option} {text!r}: use counts from 1 to 256 separated by commas, such as 1,2,4,8")
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
@click.option("--plot", type=PLOT, default=None, help="Write a chart (PNG).")
def bench_scale(quick: bool, workers: str | None, clients_per_worker: int | None, connections: int | None,
                data: str | None, repeats: int | None, small_files: int | None, large_files: int | None,
                large_mb: int | None, as_json: bool, plot: Path | None) -> None:  # fmt: skip
    """Aggregate throughput of N platform workers serving N loader processes on this machine."""
    from medbridge.bench import scale

    plan = _given(scale.Plan.quick() if quick else scale.Plan(),
                  workers=_counts(workers) if workers is not None else None,
                  data=tuple(x.strip() for x in data.split(",") if x.strip()) if data is not None else None,
                  clients_per_worker=clients_per_worker, connections=connections, repeats=repeats,
                  small_files=small_files, large_files=large_files, large_mb=large_mb)  # fmt: skip
    result = _measured(scale, plan, as_json, plot)
    if result is None:
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


@bench.command("hosts")
@click.option("--quick", is_flag=True, help="400 files, two runs (a few minutes here).")
@click.option(
    "--hosts", "hosts", default=None, help="Host counts to measure, comma-separated (default: 1,2; at most 3)."
)
@click.option("--clients-per-host", type=click.IntRange(1, 64), default=None, help="Loader processes per host.")
@click.option("--connections", type=click.IntRange(1, 64), default=None, help="SSH connections per loader.")
@click.option("--small-files", type=click.IntRange(1, 1_000_000), default=None, help="Number of ~100 KiB files.")
@click.option("--repeats", type=click.IntRange(1, 20), default=None)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--plot", type=PLOT, default=None, help="Write a chart (PNG).")
def bench_hosts(quick: bool, hosts: str | None, clients_per_host: int | None, connections: int | None,
                small_files: int | None, repeats: int | None, as_json: bool, plot: Path | None) -> None:  # fmt: skip
    """Small-file throughput of N platform hosts behind the gateway (one home, one PostgreSQL), read from hpc."""
    from medbridge.bench import hosts as bench_hosts_mod

    plan = _given(bench_hosts_mod.Plan.quick() if quick else bench_hosts_mod.Plan(),
                  hosts=_counts(hosts, "--hosts") if hosts is not None else None, clients_per_host=clients_per_host,
                  connections=connections, small_files=small_files, repeats=repeats)  # fmt: skip
    result = _measured(bench_hosts_mod, plan, as_json, plot)
    if result is None:
        return
    columns = ["hosts", "clients", "files/s", "MB/s", "speedup", "CPU-s hosts/gw/cli", "busy", "cores needed", "free"]
    rows = [
        (r["hosts"], r["clients"], r["files_per_s"], r["mb_per_s"], r["speedup"],
         f"{r['cpu_s']['hosts']}/{r['cpu_s']['gateway']}/{r['cpu_s']['clients']}", r["cores_busy"],
         r["cores_needed"], "yes" if r["cores_free"] else "no")
        for r in result["rows"]
    ]  # fmt: skip
    output.table("bench hosts (medians, through the gateway)", columns, rows)
    output.table("against the target", ["target", "measured", "met"],
                 [(t["target"], t["measured"], {True: "yes", False: "no", None: t.get("why", "-")}[t["met"]])
                  for t in result["targets"]])  # fmt: skip


# -- the original experiments ------------------------------------------------------------------------------------------

device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                             help="auto: the GPU (bf16 where supported) when torch sees one.")  # fmt: skip
scheduler_option = click.option("--scheduler", type=click.Choice(["auto", "slurm", "local"]), default="auto",
                                show_default=True,
                                help="auto: sbatch when a Slurm cluster answers, else processes.")  # fmt: skip


@bench.command("images")
@click.option("--quick", is_flag=True, help="One image of 48² (or the model's smallest) per pass, 32 loaded per test.")
@click.option("--tests", default=None, help="Tests by number or name, comma-separated (default: all 17).")
@click.option("--paths", default=None, help="local plus any of sshfs, sshfs-default, native (default: "
              "local,sshfs,native).")  # fmt: skip
@click.option("--format", "fmt", type=click.Choice(["jpeg", "png", "dicom"]), default="jpeg", show_default=True)
@click.option("--iterations", type=click.IntRange(1, 1000), default=None, help="Compute passes per path.")
@click.option("--rtt-ms", type=click.FloatRange(0, 1000), default=2.0, show_default=True,
              help="Emulated round trip to the platform.")  # fmt: skip
@click.option("--train", is_flag=True, help="Time training steps instead of inference.")
@device_option
@click.option("--network", type=click.Choice(["auto", "loopback", "sites"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--plot", type=PLOT, default=None, help="Write the grouped bar chart (PNG).")
def bench_images(quick: bool, tests: str | None, paths: str | None, fmt: str, iterations: int | None, rtt_ms: float,
                 train: bool, device: str, network: str, as_json: bool, plot: Path | None) -> None:  # fmt: skip
    """The AI-benchmark's 17 vision tests: image load and compute timed apart, from local disk, sshfs, the loader."""
    import dataclasses

    from medbridge.bench import images, vision

    _experiments()
    plan = images.Plan.quick_plan() if quick else images.Plan()
    changes: dict[str, object] = {"fmt": fmt, "rtt_ms": rtt_ms, "train": train, "device": device, "network": network}
    if tests is not None:
        changes["tests"] = tuple(t.number for t in vision.by_name(_items(tests, "--tests")))
    if paths is not None:
        changes["paths"] = _items(paths, "--paths")
    if iterations:
        changes["iterations"] = iterations
    plan = dataclasses.replace(plan, **changes)  # type: ignore[arg-type]
    result = images.run(plan, _say(as_json))
    if plot is not None:
        images.plot(result, plot)
    if as_json:
        output.emit_json(result)
        return
    output.table(
        f"bench images ({result['network']}, RTT +{rtt_ms:g} ms, {result['device']['name']})",
        ["test", "model", "path", "images", "load s", "compute s"],
        [(r["test"], r["model"], r["path"], r["images"], r["load_s"], r["compute_s"]) for r in result["rows"]],
    )
    output.table("remote / local", ["path", "load (all tests)", "load (median)", "compute (median)"],
                 [(p, v["load_ratio_total"], v["load_ratio_median"], v["compute_ratio_median"])
                  for p, v in result["summary"].items()])  # fmt: skip


@bench.command("ct-train")
@click.option("--quick", is_flag=True, help="1 job per path, 32³ volumes, 2 steps, 2 validation cases.")
@click.option("--jobs", "per_path", type=click.IntRange(1, 64), default=None, help="Jobs per path (default 4).")
@click.option("--paths", default=None, help="local plus any of mount, native (default: local,mount).")
@click.option("--cases", type=click.IntRange(5, 100_000), default=None, help="Generated cases (default 105: 84/21).")
@click.option("--size", type=click.IntRange(16, 512), default=None, help="Volume side, a multiple of 16 (default 128).")
@click.option("--epochs", type=click.IntRange(1, 10_000), default=None)
@click.option("--max-steps", type=click.IntRange(0, 1_000_000), default=None, help="Steps per epoch at most.")
@click.option("--val-cases", type=click.IntRange(0, 100_000), default=None, help="Validation cases (0: all).")
@click.option(
    "--from",
    "source",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Your own CT cases (NAME.nii with NAME_seg.nii) instead of the generated chest CT; ingested through the gate.",
)
@click.option("--alone/--no-alone", default=None, help="Run one local job alone first (the interference baseline).")
@click.option("--rtt-ms", type=click.FloatRange(0, 1000), default=2.0, show_default=True)
@scheduler_option
@device_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep each job's CSVs here (one folder per job).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--plot", type=PLOT, default=None, help="Write the per-job chart (PNG).")
def bench_ct_train(quick: bool, per_path: int | None, paths: str | None, cases: int | None, size: int | None,
                   epochs: int | None, max_steps: int | None, val_cases: int | None, source: Path | None,
                   alone: bool | None,
                   rtt_ms: float, scheduler: str, device: str, out: Path | None, as_json: bool,
                   plot: Path | None) -> None:  # fmt: skip
    """MONAI's V-Net trained by N jobs on local copies and N on the platform at the same time; CSVs per job."""
    import dataclasses

    from medbridge.bench import cttrain

    _experiments()
    plan = cttrain.Plan.quick() if quick else cttrain.Plan()
    changes: dict[str, object] = {"rtt_ms": rtt_ms, "scheduler": scheduler, "device": device}
    for key, value in (("jobs", per_path), ("cases", cases), ("size", size), ("epochs", epochs),
                       ("max_steps", max_steps), ("val_cases", val_cases), ("alone", alone),
                       ("source", source)):  # fmt: skip
        if value is not None:
            changes[key] = value
    if paths is not None:
        changes["paths"] = _items(paths, "--paths")
    plan = dataclasses.replace(plan, **changes)  # type: ignore[arg-type]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    result = cttrain.run(plan, _say(as_json), out=out)
    if plot is not None:
        cttrain.plot(result, plot)
    if as_json:
        output.emit_json(result)
        return
    output.table(f"bench ct-train (via {result['scheduler']})", ["job", "path", "wall s", "load s", "step s", "Dice"],
                 [(j["name"], j["path"], j["wall_s"], j["load_s"], j["step_s"], j["val_dice"][-1])
                  for j in result["jobs"]])  # fmt: skip
    output.table(
        "mean wall time, remote / local",
        ["path", "wall", "median step"],
        [(p, v["wall"], v["step"]) for p, v in result["ratios"].items()],
    )


@bench.command("pretrain")
@click.option("--quick", is_flag=True, help="3 jobs of 2 steps, 32³ volumes, a small encoder.")
@click.option("--jobs", "chain", type=click.IntRange(1, 1000), default=None, help="Jobs in the chain (default 4).")
@click.option("--steps-per-job", type=click.IntRange(1, 10_000_000), default=None)
@click.option("--size", type=click.IntRange(32, 512), default=None, help="Volume side, a multiple of 32 (default 96).")
@click.option("--feature-size", type=click.IntRange(12, 192), default=None, help="SwinUNETR feature size.")
@click.option("--cases", type=click.IntRange(2, 100_000), default=None)
@click.option("--val-every", type=click.IntRange(0, 1_000_000), default=None)
@click.option(
    "--from",
    "source",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Your own CT cases (NAME.nii) instead of the generated chest CT; ingested through the gate.",
)
@click.option("--path", type=click.Choice(["native", "mount"]), default="native", show_default=True)
@click.option("--rtt-ms", type=click.FloatRange(0, 1000), default=2.0, show_default=True)
@scheduler_option
@device_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Where each job's log is kept (the input of 'bench loss-curve').")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--plot", type=PLOT, default=None, help="Write the loss curve (PNG).")
def bench_pretrain(quick: bool, chain: int | None, steps_per_job: int | None, size: int | None,
                   feature_size: int | None, cases: int | None, val_every: int | None, source: Path | None,
                   path: str, rtt_ms: float,
                   scheduler: str, device: str, out: Path, as_json: bool, plot: Path | None) -> None:  # fmt: skip
    """Self-supervised Swin Transformer pre-training as a chain of jobs resuming from checkpoints on the platform."""
    import dataclasses

    from medbridge.bench import losscurve, pretrain

    _experiments()
    plan = pretrain.Plan.quick() if quick else pretrain.Plan()
    changes: dict[str, object] = {"path": path, "rtt_ms": rtt_ms, "scheduler": scheduler, "device": device}
    for key, value in (("jobs", chain), ("steps_per_job", steps_per_job), ("size", size),
                       ("feature_size", feature_size), ("cases", cases), ("val_every", val_every),
                       ("source", source)):  # fmt: skip
        if value is not None:
            changes[key] = value
    out.mkdir(parents=True, exist_ok=True)
    result = pretrain.run(dataclasses.replace(plan, **changes), out, _say(as_json))  # type: ignore[arg-type]
    if plot is not None:
        losscurve.plot(losscurve.load(out), plot)
    if as_json:
        output.emit_json(result)
        return
    _curve_table(result)


def _curve_table(result: dict[str, Any]) -> None:
    output.table("pre-training chain", ["jobs", "steps", "lost", "repeated", "continuous", "final val loss"],
                 [(len(result["jobs"]), result["steps"], len(result["lost_steps"]), len(result["repeated_steps"]),
                   result["continuous"], result["final_val_loss"])])  # fmt: skip


@bench.command("loss-curve")
@click.argument("results", type=click.Path(file_okay=False, path_type=Path))
@click.option("--plot", type=PLOT, default=None, help="Write the curve (PNG).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def bench_loss_curve(results: Path, plot: Path | None, as_json: bool) -> None:
    """Validation loss over wall time from the pre-training jobs' logs below RESULTS, and whether the chain held."""
    from medbridge.bench import losscurve

    rows = losscurve.load(results)
    checked = losscurve.check(rows)
    if plot is not None:
        losscurve.plot(rows, plot)
    if as_json:
        output.emit_json(checked)
        return
    _curve_table(checked)


@bench.command("report")
@click.option("--profile", type=click.Choice(["quick", "full"]), default="quick", show_default=True,
              help="quick: minutes on 2 CPU cores; full: the original sizes, the GPU when there is one.")  # fmt: skip
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder of the report; results already there are reused.")  # fmt: skip
@click.option("--only", default=None, help="Run only these parts: rtt, images, ct-train, outage, pretrain.")
@scheduler_option
@device_option
def bench_report(profile: str, out: Path, only: str | None, scheduler: str, device: str) -> None:
    """Every experiment of the original system, and one Markdown report with each figure beside the original's."""
    from medbridge.bench import report

    _experiments()
    parts = _items(only, "--only") if only is not None else report.PARTS
    path = report.run(profile, out, _say(False), scheduler=scheduler, device=device, only=parts)
    output.ok(str(path))


@bench.command("catalogue")
@click.option("--sizes", default="10000,100000,1000000", show_default=True, help="Dataset sizes, comma-separated.")
@click.option("--database", default="", help="Control database URL, or 'postgresql' for a private server started "
              "for the run (default: SQLite in the benchmark's home).")  # fmt: skip
@click.option("--concurrent", type=click.IntRange(0, 64), default=0, show_default=True,
              help="Also start this many jobs reading one dataset at once (the starvation test).")  # fmt: skip
@click.option("--concurrent-size", type=click.IntRange(1), default=100_000, show_default=True,
              help="The size whose dataset they read (the largest measured if not among --sizes).")  # fmt: skip
@click.option("--seconds", type=click.FloatRange(1, 3600), default=20.0, show_default=True,
              help="How long each concurrent job reads.")  # fmt: skip
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to generate files (default: the system's temporary folder).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--plot", type=PLOT, default=None, help="Write a chart (PNG).")
def bench_catalogue(sizes: str, database: str, concurrent: int, concurrent_size: int, seconds: float,
                    workdir: Path | None, as_json: bool, plot: Path | None) -> None:  # fmt: skip
    """What dataset add, manifests, job start, residue scan and the audit cost as a dataset grows."""
    from medbridge.bench import catalogue
    from medbridge.errors import InvalidInput

    try:
        counts = tuple(int(x) for x in sizes.split(","))
    except ValueError:
        raise InvalidInput(f"--sizes {sizes!r}: use counts separated by commas, such as 10000,100000") from None
    plan = catalogue.Plan(sizes=counts, database=database, concurrent=concurrent, concurrent_size=concurrent_size,
                          seconds=seconds, workdir=workdir)  # fmt: skip
    say = (lambda m: None) if as_json else (lambda m: output.err.print(m, highlight=False))
    result = catalogue.run(plan, say)
    if plot is not None:
        catalogue.plot(result, plot)
    if as_json:
        output.emit_json(result)
        return
    output.table(f"bench catalogue on {result['database']} ({result['machine']})",
                 ["step", "files", "seconds", "peak RSS MB", "files/s"],
                 [(r["step"], r["files"], r["seconds"], r["peak_rss_mb"], r["files_per_s"] or "")
                  for r in result["rows"]])  # fmt: skip
    output.table("growth exponents (1 = linear)", ["step", "exponent"], list(result["exponents"].items()))
    if "concurrent" in result:
        c = result["concurrent"]
        output.out.print(f"{c['jobs']} jobs on {c['dataset']}: first files {c['first_file_s']} s; {c['reads']} reads; "
                         f"longest window with no read {c['longest_gap_s']} s", highlight=False)  # fmt: skip
        for error in c["errors"]:
            output.err.print(f"a job failed: {error}", markup=False, highlight=False)
    output.table(
        "against the targets",
        ["target", "measured", "met"],
        [(v["target"], v["value"], "yes" if v["met"] else "no") for v in result["verdicts"]],
    )
