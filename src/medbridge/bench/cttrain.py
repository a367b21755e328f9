"""``bench ct-train``: V-Net segmentation training, N jobs on local copies and N on the platform at the same time
(the original's Fig 5: 4 local ∥ 4 remote, remote about 2% slower, no interference).

The dataset is a generated chest CT (105 cases: the original's 84/21 split), sized by
the profile, ingested into the benchmark's platform; its local copy is the folder it was
ingested from.  Each job is MONAI's V-Net (:mod:`medbridge.bench.vnet_job`) under
``medbridge job run``: through Slurm when a cluster answers, else as processes, all
started together.  Their CSVs come back from the platform's results; the figure is one
bar per job, and the verdict the ratio of mean wall times (remote over local).
"""

from __future__ import annotations

import csv
import os
import shutil
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medbridge.bench import ctdata, jobs
from medbridge.errors import InvalidInput

PATHS = ("local", "mount", "native")
DATASET = "chest-ct"
CSVS = ("job.csv", "epochs.csv", "steps.csv")


@dataclass(frozen=True, kw_only=True)
class Plan:
    jobs: int = 4  # per path
    paths: tuple[str, ...] = ("local", "mount")
    cases: int = 105
    size: int = 128
    epochs: int = 2
    max_steps: int = 0
    val_cases: int = 0
    rtt_ms: float = 2.0
    scheduler: str = "auto"
    device: str = "auto"
    source: Path | None = None  # a folder of one's own CT cases instead of the generated chest CT
    alone: bool = True  # one local job alone first: what "no interference" is measured against
    timeout: float = 24 * 3600.0

    @classmethod
    def quick(cls) -> Plan:
        return cls(jobs=1, paths=PATHS, size=32, epochs=1, max_steps=2, val_cases=2, alone=False, timeout=1800.0)

    def check(self) -> None:
        if "local" not in self.paths or any(p not in PATHS for p in self.paths):
            raise InvalidInput(f"--paths: local and any of mount, native (got {', '.join(self.paths)})")
        if self.size % 16:
            raise InvalidInput(f"--size {self.size}: V-Net needs a multiple of 16")
        if self.cases < 5:
            raise InvalidInput(f"--cases {self.cases}: at least 5 (4 to train, 1 to validate)")


def run(plan: Plan, progress: Callable[[str], None] = lambda _m: None, out: Path | None = None) -> dict[str, Any]:
    from medbridge.bench import device

    plan.check()
    how = jobs.scheduler(plan.scheduler)
    total = plan.jobs * len(plan.paths)
    dev = device.pick(plan.device)
    threads = 0 if dev.type == "cuda" else max(1, (os.cpu_count() or 1) // total)
    with jobs.workspace("medbridge-bench-ct-") as root:
        bench = jobs.Bench(root, plan.rtt_ms, progress)
        try:
            src = root / "local" / DATASET
            src = ctdata.prepare(plan.source, src, plan.cases, (plan.size,) * 3, True, progress)
            bench.add_dataset(DATASET, src)
            bench.start(workers=min(4, os.cpu_count() or 1))
            requests = [_request(plan, p, i, src, threads) for p in plan.paths for i in range(1, plan.jobs + 1)]
            alone: list[jobs.JobDone] = []
            if plan.alone:
                progress("one local job alone first (the baseline for interference)")
                alone = jobs.launch(bench, [_request(plan, "local", 0, src, threads, "alone")], how, plan.timeout,
                                    progress)  # fmt: skip
                jobs.require_ok(alone)
            progress(f"{total} jobs at once ({', '.join(f'{plan.jobs} {p}' for p in plan.paths)}) via {how}")
            done = jobs.launch(bench, requests, how, plan.timeout, progress)
            jobs.require_ok(done)
            rows = [_collect(d, path_of(d.name), out) for d in alone + done]
        finally:
            bench.close()
    return summarise(plan, how, rows, threads)


def path_of(name: str) -> str:
    return "alone" if name == "alone" else name.rsplit("-", 1)[0]


def _request(plan: Plan, path: str, i: int, src: Path, threads: int, name: str | None = None) -> jobs.JobRequest:
    data = f"local:{src}" if path == "local" else f"{path}:{DATASET}"
    name = name or f"{path}-{i}"
    cmd = [sys.executable, "-m", "medbridge.bench.vnet_job", "--data", data, "--out", "outputs", "--name", name,
           "--epochs", str(plan.epochs), "--max-steps", str(plan.max_steps), "--val-cases", str(plan.val_cases),
           "--threads", str(threads), "--device", plan.device]  # fmt: skip
    return jobs.JobRequest(name, cmd, mount=path == "mount")


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _collect(done: jobs.JobDone, path: str, out: Path | None) -> dict[str, Any]:
    """One job's numbers, from the CSVs it committed to the platform (copied to ``out`` as well)."""
    missing = [n for n in CSVS if not (done.results / n).is_file()]
    if missing:
        raise InvalidInput(f"job {done.name} ({done.job_id}) committed no {', '.join(missing)} to the platform")
    if out is not None:
        (out / done.name).mkdir(parents=True, exist_ok=True)
        for n in CSVS:
            shutil.copyfile(done.results / n, out / done.name / n)
    (job,) = _read(done.results / "job.csv")
    epochs = _read(done.results / "epochs.csv")
    steps = _read(done.results / "steps.csv")
    return {
        "name": done.name, "job_id": done.job_id, "path": path, "wall_s": float(job["wall_s"]),
        "load_s": float(job["load_s"]), "compute_s": float(job["compute_s"]), "steps": int(job["steps"]),
        "epoch_s": [float(e["seconds"]) for e in epochs], "val_loss": [float(e["val_loss"]) for e in epochs],
        "val_dice": [float(e["val_dice"]) for e in epochs],
        "step_s": round(statistics.median(float(s["load_s"]) + float(s["compute_s"]) for s in steps), 4),
        "loss": [float(s["loss"]) for s in steps], "device": job["device"], "bf16": job["bf16"] == "True",
        "results": str(done.results.relative_to(done.results.parents[2])),
    }  # fmt: skip


def summarise(plan: Plan, how: str, rows: Sequence[dict[str, Any]], threads: int) -> dict[str, Any]:
    """Ratios of mean wall time and of median step time, remote over local; each job against the one alone."""
    mean = {p: statistics.fmean(r["wall_s"] for r in rows if r["path"] == p) for p in {r["path"] for r in rows}}
    step = {p: statistics.fmean(r["step_s"] for r in rows if r["path"] == p) for p in mean}
    ratios = {p: {"wall": round(mean[p] / mean["local"], 4), "step": round(step[p] / step["local"], 4)}
              for p in mean if p not in ("local", "alone")}  # fmt: skip
    concurrent = [r for r in rows if r["path"] != "alone"]
    cores = os.cpu_count() or 1
    result: dict[str, Any] = {
        "plan": {**asdict(plan), "paths": list(plan.paths)}, "scheduler": how, "jobs": list(rows),
        "mean_wall_s": {p: round(v, 3) for p, v in mean.items()}, "ratios": ratios,
        "threads_per_job": threads, "cores": cores,
        "cores_enough": threads == 0 or cores >= len(concurrent),
    }  # fmt: skip
    if "alone" in mean:
        result["worst_vs_alone"] = round(max(r["wall_s"] for r in concurrent) / mean["alone"], 4)
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    """One bar per job (wall time), coloured by where it read; the means as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["jobs"]
    colours = {"alone": "#8c8c8c", "local": "#4c72b0", "mount": "#dd8452", "native": "#55a868"}
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(rows) + 2), 3.8))
    ax.bar([r["name"] for r in rows], [r["wall_s"] for r in rows], color=[colours[r["path"]] for r in rows])
    for p, v in result["mean_wall_s"].items():
        ax.axhline(v, color=colours[p], lw=1, ls="--")
    ratio = ", ".join(f"{p}/local {v['wall']:.3f}" for p, v in result["ratios"].items())
    ax.set_ylabel("job wall time (s)")
    ax.set_title(f"V-Net training, jobs at once via {result['scheduler']}\n(mean wall time: {ratio})", fontsize=9)
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
