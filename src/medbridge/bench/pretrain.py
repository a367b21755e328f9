"""``bench pretrain``: a foundation model's pre-training as a chain of jobs that checkpoint to the platform and
resume from the last checkpoint (the original's Fig 7 ran about 9 days: longer than any job or certificate).

The benchmark's platform holds a generated chest-CT dataset; job k of the chain (MONAI's
SwinUNETR, :mod:`medbridge.bench.pretrain_job`) reads it through the native loader (or
the mount), loads job k-1's checkpoint from the platform's results, trains its share of
steps and commits a new checkpoint and its log.  Through Slurm the chain is ``afterok``
dependencies; without a cluster, one process after another.  The logs come back from
the platform, and :mod:`medbridge.bench.losscurve` checks and draws them.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medbridge.bench import ctdata, jobs, losscurve
from medbridge.bench.pretrain_job import LOG
from medbridge.errors import InvalidInput

DATASET = "ct-pretrain"


@dataclass(frozen=True, kw_only=True)
class Plan:
    jobs: int = 4
    steps_per_job: int = 50
    size: int = 96
    feature_size: int = 24
    cases: int = 105
    val_cases: int = 4
    val_every: int = 10
    path: str = "native"
    rtt_ms: float = 2.0
    scheduler: str = "auto"
    device: str = "auto"
    source: Path | None = None  # a folder of one's own CT cases instead of the generated chest CT
    timeout: float = 24 * 3600.0

    @classmethod
    def quick(cls) -> Plan:
        return cls(jobs=3, steps_per_job=2, size=32, feature_size=12, cases=10, val_cases=2, val_every=0,
                   timeout=1800.0)  # fmt: skip

    def check(self) -> None:
        if self.jobs < 1 or self.steps_per_job < 1:
            raise InvalidInput("--jobs and --steps-per-job: at least 1")
        if self.size % 32:
            raise InvalidInput(f"--size {self.size}: SwinUNETR needs a multiple of 32")
        if self.path not in ("mount", "native"):
            raise InvalidInput(f"--path {self.path!r}: mount or native (the chain reads through the platform)")
        if self.cases < 2:
            raise InvalidInput("--cases: at least 2")


def run(plan: Plan, out: Path, progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Run the chain; its logs are copied to ``out`` (one folder per job) and checked."""
    plan.check()
    how = jobs.scheduler(plan.scheduler)
    threads = os.cpu_count() or 1
    with jobs.workspace("medbridge-bench-pretrain-") as root:
        bench = jobs.Bench(root, plan.rtt_ms, progress)
        try:
            src = root / "local" / DATASET
            src = ctdata.prepare(plan.source, src, plan.cases, (plan.size,) * 3, False, progress)
            bench.add_dataset(DATASET, src)
            bench.start(workers=min(2, threads))
            requests = []
            for k in range(1, plan.jobs + 1):
                cmd = [sys.executable, "-m", "medbridge.bench.pretrain_job", "--data", f"{plan.path}:{DATASET}",
                       "--out", "outputs", "--name", f"pretrain-{k}", "--steps", str(plan.steps_per_job),
                       "--feature-size", str(plan.feature_size), "--val-cases", str(plan.val_cases),
                       "--val-every", str(plan.val_every), "--threads", str(threads),
                       "--device", plan.device]  # fmt: skip
                if k > 1:
                    cmd += ["--resume", f"/results/{jobs.USER}/{{after}}"]
                requests.append(jobs.JobRequest(f"pretrain-{k}", cmd, mount=plan.path == "mount",
                                                after=f"pretrain-{k - 1}" if k > 1 else None))  # fmt: skip
            progress(f"a chain of {plan.jobs} jobs via {how}, {plan.steps_per_job} steps each")
            done = jobs.launch(bench, requests, how, plan.timeout, progress)
            jobs.require_ok(done)
            for d in done:
                (out / d.name).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(d.results / LOG, out / d.name / LOG)
            committed = {d.name: sorted(p.name for p in d.results.iterdir()) for d in done}
        finally:
            bench.close()
    rows = losscurve.load(out)
    return {"plan": {**asdict(plan)}, "scheduler": how, "job_ids": [d.job_id for d in done],
            "committed": committed, **losscurve.check(rows)}  # fmt: skip
