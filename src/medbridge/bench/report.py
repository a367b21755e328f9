"""``bench report``: every experiment of the original system in one run, and one Markdown report of them.

For each experiment the report looks in ``DIR`` for its JSON first (so a long run can be
resumed, or a figure rerun alone by deleting its JSON) and runs it otherwise, writing the
JSON and the figure beside the report.  The outage figure comes from ``medbridge bench
outage`` (run as a command, as a user would).  The report puts each figure beside the
original system's published value and beside plain sshfs measured in the same run.

Profiles: ``quick`` runs on 2 CPU cores in minutes (tiny volumes and images, few steps,
still the real models, Slurm when a cluster answers, the real mounts and loader);
``full`` uses the original sizes and picks the GPU (bf16) when there is one.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medbridge.errors import InvalidInput, MedbridgeError

PROFILES = ("quick", "full")
PARTS = ("rtt", "images", "ct-train", "outage", "pretrain")
#: What the original system published for each figure (from its paper, as issue 15 quotes it).
ORIGINAL = {
    "rtt": "min/avg/max for three site pairs, a few ms, rising with distance (axis to 9 ms)",
    "images": "remote image loading ≥ 1.5x local (sshfs); compute unchanged",
    "ct-train": "4 local ∥ 4 remote V-Net jobs: remote about 1.02x local wall time, no interference",
    "outage": "link cut about 300 s, about 500 s into a segmentation job: the job finished normally",
    "pretrain": "Swin Transformer pre-trained on ~33,000 CT volumes for ~9 days on one 4-GPU node; "
    "validation loss converging",
}


def run(profile: str, out: Path, progress: Callable[[str], None] = lambda _m: None, *, scheduler: str = "auto",
        device: str = "auto", only: tuple[str, ...] = PARTS) -> Path:  # fmt: skip
    if profile not in PROFILES:
        raise InvalidInput(f"--profile {profile!r}: choose from {', '.join(PROFILES)}")
    unknown = [p for p in only if p not in PARTS]
    if unknown:
        raise InvalidInput(f"--only {', '.join(unknown)}: choose from {', '.join(PARTS)}")
    out.mkdir(parents=True, exist_ok=True)
    quick = profile == "quick"
    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "rtt": lambda: _rtt(out, quick, progress),
        "images": lambda: _images(out, quick, device, progress),
        "ct-train": lambda: _cttrain(out, quick, scheduler, device, progress),
        "outage": lambda: _outage(out, quick, progress),
        "pretrain": lambda: _pretrain(out, quick, scheduler, device, progress),
    }
    for part in PARTS:
        saved = out / f"{part}.json"
        if saved.exists():
            progress(f"{part}: reusing {saved}")
            results[part] = json.loads(saved.read_text())
            continue
        if part not in only:
            continue
        progress(f"{part}: running ({profile})")
        t0 = time.monotonic()
        try:
            result = runners[part]()
        except MedbridgeError as exc:  # the report says so, the others still run, and the command fails at the end
            progress(f"{part}: failed: {exc}")
            results[part] = {"failed": str(exc)}
            continue
        result["seconds"] = round(time.monotonic() - t0, 1)
        tmp = saved.with_suffix(".json.partial")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.rename(saved)  # a JSON found here is always a whole one
        results[part] = result
    report = out / "report.md"
    report.write_text(markdown(profile, results, time.monotonic() - started))
    failed = [p for p, r in results.items() if "failed" in r]
    if failed:
        raise MedbridgeError(f"{', '.join(failed)} failed (see {report}); rerun to retry only those")
    return report


# -- the experiments ------------------------------------------------------------------------------------------------


def _rtt(out: Path, quick: bool, say: Callable[[str], None]) -> dict[str, Any]:
    from medbridge.bench import sites
    from medbridge.testing import netns

    why = netns.available()
    if why is not None:
        return {"skipped": f"the four places cannot be built here: {why}"}
    result = sites.run(samples=20 if quick else 200, progress=say)
    sites.plot(result, out / "rtt.png")
    return {**result, "figure": "rtt.png"}


def _images(out: Path, quick: bool, device: str, say: Callable[[str], None]) -> dict[str, Any]:
    from medbridge.bench import images

    plan = images.Plan.quick_plan() if quick else images.Plan(paths=images.PATHS)
    if quick:
        plan = replace(plan, paths=("local", "sshfs-default", "native"))
    result = images.run(replace(plan, device=device), say)
    images.plot(result, out / "images.png")
    return {**result, "figure": "images.png"}


def _cttrain(out: Path, quick: bool, scheduler: str, device: str, say: Callable[[str], None]) -> dict[str, Any]:
    from medbridge.bench import cttrain

    plan = cttrain.Plan.quick() if quick else cttrain.Plan(paths=cttrain.PATHS)
    result = cttrain.run(replace(plan, scheduler=scheduler, device=device), say, out=out / "ct-train")
    cttrain.plot(result, out / "ct-train.png")
    return {**result, "figure": "ct-train.png"}


def _outage(out: Path, quick: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """``medbridge bench outage`` for each path (the native loader only, in the quick profile), as a command."""
    runs = {}
    for path in ("native",) if quick else ("native", "mount"):
        figure = f"outage-{path}.png"
        cmd = [sys.executable, "-m", "medbridge", "bench", "outage", *(["--quick"] if quick else []), "--json",
               "--plot", str(out / figure), "--path", path]  # fmt: skip
        say(f"outage: {' '.join(cmd[1:])}")
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
        if r.returncode == 2 and "No such command" in r.stderr:
            return {"skipped": "this build has no 'medbridge bench outage' (issue 13)", "command": " ".join(cmd[1:])}
        if r.returncode != 0:
            said = [x for x in r.stderr.strip().splitlines() if x.strip()]
            runs[path] = {"failed": f"exit {r.returncode}: {said[-1] if said else 'no output'}"}
            continue
        runs[path] = {**json.loads(r.stdout), "figure": figure}
    return {"runs": runs}


def _pretrain(out: Path, quick: bool, scheduler: str, device: str, say: Callable[[str], None]) -> dict[str, Any]:
    from medbridge.bench import losscurve, pretrain

    plan = pretrain.Plan.quick() if quick else pretrain.Plan()
    logs = out / "pretrain"
    logs.mkdir(exist_ok=True)
    result = pretrain.run(replace(plan, scheduler=scheduler, device=device), logs, say)
    losscurve.plot(losscurve.load(logs), out / "loss-curve.png")
    return {**result, "figure": "loss-curve.png"}


# -- the report -------------------------------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _verdict(ok: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "—"}[ok]


def table(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, str, str, str]]:
    """The side-by-side table: figure, original, medbridge (this run), plain sshfs (this run), target, verdict."""
    rows = []
    r = results.get("rtt", {})
    if r.get("rows"):
        sftp = {f"{x['src']}-{x['dst']}": x for x in r["rows"] if x["level"] == "sftp"}
        tcp = {f"{x['src']}-{x['dst']}": x for x in r["rows"] if x["level"] == "tcp"}
        ours = "; ".join(f"{k} {v['median_ms']:.1f} ms (links {v['emulated_ms']:g})" for k, v in sftp.items())
        plain = "; ".join(f"{k} {v['median_ms']:.1f}" for k, v in tcp.items())
        order = sorted(sftp.values(), key=lambda v: v["emulated_ms"])
        rising = all(a["median_ms"] <= b["median_ms"] for a, b in itertools.pairwise(order)
                     if a["emulated_ms"] < b["emulated_ms"])  # fmt: skip
        rows.append(("Fig 3 RTT per pair (SFTP median)", ORIGINAL["rtt"], ours, f"TCP echo: {plain}",
                     "rises with distance", _verdict(rising)))  # fmt: skip
    r = results.get("images", {})
    if r.get("summary"):
        s = r["summary"]
        native, sshfs = s.get("native", {}), s.get("sshfs-default") or s.get("sshfs") or {}
        nl, pl = native.get("load_ratio_total"), sshfs.get("load_ratio_total")
        rows.append(("Fig 4 image load, remote/local (all 17 tests)", "≥ 1.5", f"native loader {_fmt(nl)}",
                     f"sshfs {_fmt(pl)}", "≤ 1.1 native", _verdict(None if nl is None else nl <= 1.1)))  # fmt: skip
        nc, pc = native.get("compute_ratio_median"), sshfs.get("compute_ratio_median")
        rows.append(("Fig 4 compute, remote/local (median per test)", "unchanged", f"native {_fmt(nc)}",
                     f"sshfs {_fmt(pc)}", "1 within noise (±10%)",
                     _verdict(None if nc is None else abs(nc - 1) <= 0.1)))  # fmt: skip
    r = results.get("ct-train", {})
    if r.get("ratios"):
        nat, mnt = r["ratios"].get("native", {}), r["ratios"].get("mount", {})
        rows.append(("Fig 5 V-Net jobs, mean wall remote/local", "≈ 1.02 (sshfs)", f"native {_fmt(nat.get('wall'), 3)}",
                     f"sshfs mount {_fmt(mnt.get('wall'), 3)}", "≤ 1.01",
                     _verdict(None if "wall" not in nat else nat["wall"] <= 1.01)))  # fmt: skip
        if "worst_vs_alone" in r:
            cores = "" if r.get("cores_enough") else " (fewer cores than jobs here)"
            rows.append(("Fig 5 interference: slowest job / one alone", "no interference",
                         f"{_fmt(r['worst_vs_alone'], 3)}{cores}", "—", "≤ 1.05",
                         _verdict(r["worst_vs_alone"] <= 1.05)))  # fmt: skip
    r = results.get("outage", {})
    if r.get("runs"):

        def said(run: dict[str, Any] | None) -> str:
            if not run:
                return "not run"
            if "failed" in run:
                return f"failed ({run['failed']})"
            return (f"completed {run.get('completed')}, outputs match {run.get('outputs_match')}, "
                    f"cut {run.get('cut_s')} s, stall {run.get('stall_s')} s")  # fmt: skip

        nat = r["runs"].get("native")
        ok = None
        if nat and "failed" not in nat:
            ok = bool(nat.get("completed") and nat.get("outputs_match") and nat["stall_s"] <= nat["cut_s"] + 30)
        mount = said(r["runs"].get("mount"))
        rows.append(("Fig 6 outage", ORIGINAL["outage"], f"native: {said(nat)}", f"mount: {mount}",
                     "completes, outputs identical, stall ≤ cut + 30 s", _verdict(ok)))  # fmt: skip
    elif r.get("skipped"):
        rows.append(("Fig 6 outage", ORIGINAL["outage"], f"not run: {r['skipped']}", "—", "—", "—"))
    r = results.get("pretrain", {})
    if "continuous" in r:
        ok = r["continuous"] and len(r["jobs"]) >= 3
        first = next((v for _, v in r.get("val", [])), None)
        rows.append(("Fig 7 pre-training chain", ORIGINAL["pretrain"],
                     f"{len(r['jobs'])} jobs, {r['steps']} steps, lost {len(r['lost_steps'])}, repeated "
                     f"{len(r['repeated_steps'])}; val loss {_fmt(first, 4)} → {_fmt(r.get('final_val_loss'), 4)}",
                     "—", "≥ 3 jobs, no lost steps, continuous", _verdict(ok)))  # fmt: skip
    return rows


def _machine() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:
        gpu = "torch missing"
    return f"{platform.node()}: {os.cpu_count()} cores, {gpu}, Python {platform.python_version()}"


def markdown(profile: str, results: dict[str, dict[str, Any]], seconds: float) -> str:
    lines = [
        f"# medbridge: the original experiments ({profile} profile)", "",
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {_machine()}, {seconds:.0f} s "
        f"(`medbridge bench report --profile {profile}`).", "",
        "| figure | original system (published) | medbridge, this run | plain sshfs, this run | target | verdict |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    lines += [f"| {' | '.join(row)} |" for row in table(results)]
    lines += [f"| {part} | {ORIGINAL[part]} | **failed**: {r['failed']} | — | — | **not met** |"
              for part, r in results.items() if "failed" in r]  # fmt: skip
    lines += ["", "Ratios are measured in one run against local disk (or a job alone) on the same machine."]
    for part in PARTS:
        lines += ["", *_section(part, results.get(part))]
    return "\n".join(lines) + "\n"


def _section(part: str, r: dict[str, Any] | None) -> list[str]:
    title = {"rtt": "Fig 3: round trips between places", "images": "Fig 4: the 17 vision tests, load and compute",
             "ct-train": "Fig 5: V-Net training, local and remote jobs at once", "outage": "Fig 6: a cut link",
             "pretrain": "Fig 7: pre-training as a chain of jobs"}[part]  # fmt: skip
    out = [f"## {title}", ""]
    if r is None:
        return [*out, "Not run in this report (`--only`)."]
    if "skipped" in r:
        return [*out, f"Not run: {r['skipped']}."]
    if "failed" in r:
        return [*out, f"**Failed in this run**: {r['failed']}"]
    if part == "outage":
        for path, run in r["runs"].items():
            if "figure" in run:
                out += [f"![outage, {path}]({run['figure']})", ""]
            out.append(f"- {path}: " + ", ".join(f"{k} {run[k]}" for k in ("completed", "outputs_match", "cut_at_s",
                                                                               "cut_s", "stall_s", "failed")
                                                  if k in run))  # fmt: skip
        return out
    out += [f"![{part}]({r['figure']})", ""]
    if part == "rtt":
        out += ["| pair | level | links add (ms) | min | mean | median | max |", "|---|---|---|---|---|---|---|"]
        out += [f"| {x['src']} ↔ {x['dst']} | {x['level']} | {x['emulated_ms']} | {x['min_ms']} | {x['mean_ms']} | "
                f"{x['median_ms']} | {x['max_ms']} |" for x in r["rows"]]  # fmt: skip
        out += ["", f"One-way delay per link (ms): {r['delays_ms']}; {r['samples']} samples per pair and level."]
    elif part == "images":
        paths = [p for p in ("sshfs", "sshfs-default", "native") if p in r["summary"]]
        out += [f"{r['network']} network, RTT +{r['rtt_ms']} ms, {r['device']['name']}, batch and size per test "
                f"{'shrunk (quick)' if r['plan']['quick'] else 'as the original'}.", "",
                "| test | model | source | " + " | ".join(f"{p} load ×" for p in paths) + " | " +
                " | ".join(f"{p} compute ×" for p in paths) + " |",
                "|---|---|---|" + "---|" * (2 * len(paths))]  # fmt: skip
        by = {(x["test"], x["path"]): x for x in r["ratios"]}
        for row in (x for x in r["rows"] if x["path"] == "local"):
            cells = [_fmt(by.get((row["test"], p), {}).get("load_ratio")) for p in paths]
            cells += [_fmt(by.get((row["test"], p), {}).get("compute_ratio")) for p in paths]
            note = f" ({row['note']})" if row["note"] else ""
            out.append(f"| {row['test']} | {row['model']} | {row['source']}{note} | " + " | ".join(cells) + " |")
    elif part == "ct-train":
        out += [f"Via {r['scheduler']}; {r['threads_per_job'] or 'GPU'} thread(s) per job on {r['cores']} cores.", "",
                "| job | read from | wall s | load s | compute s | median step s | val Dice (last epoch) |",
                "|---|---|---|---|---|---|---|"]  # fmt: skip
        out += [f"| {j['name']} | {j['path']} | {j['wall_s']} | {j['load_s']} | {j['compute_s']} | {j['step_s']} | "
                f"{j['val_dice'][-1]} |" for j in r["jobs"]]  # fmt: skip
        out += ["", "Each job's steps.csv, epochs.csv and job.csv were committed to the platform by `job run` and "
                "copied to `ct-train/`."]  # fmt: skip
    elif part == "pretrain":
        out += [f"{len(r['jobs'])} jobs via {r['scheduler']} ({', '.join(r['job_ids'])}); each committed "
                f"{', '.join(r['committed'][r['jobs'][0]])}.", ""]  # fmt: skip
        for x in r["resumes"]:
            out.append(f"- {x['from']} → {x['to']}: resumed {x['resumed']}, step gap {x.get('step_gap')}, "
                       f"validation loss {x.get('val_loss_before')} → {x.get('val_loss_after')}")  # fmt: skip
    return out
