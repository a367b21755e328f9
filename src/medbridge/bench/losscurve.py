"""``bench loss-curve``: the pre-training chain's validation loss over wall time (the original's Fig 7), and
whether the chain lost or repeated a step.

Reads every ``pretrain-log.csv`` below a folder (a platform home's ``results/USER``, or
the copies ``bench pretrain --out`` keeps), one per job.  Continuity is checked, not
assumed: training steps must run 1..N with none missing or repeated, each resumed job
must start where its predecessor ended (same step, same wall time), and the validation
loss of the weights a job loaded must equal the last one its predecessor logged.
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medbridge.bench.pretrain_job import HEADER, LOG
from medbridge.errors import InvalidInput, NotFound

#: How close a resumed job's first validation loss must be to its predecessor's last (relative).
TOLERANCE = 1e-3


def load(folder: Path) -> list[dict[str, Any]]:
    """Every row of every job's log below ``folder``, in chain order (jobs by their first step and wall time)."""
    if not folder.is_dir():
        raise NotFound(f"{folder}: no such folder")
    logs = []
    for log in sorted(folder.rglob(LOG)):
        rows: list[dict[str, Any]] = []
        with open(log, newline="") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != HEADER:
                raise InvalidInput(f"{log}: not a pretrain log (columns {', '.join(HEADER)})")
            for r in reader:
                try:
                    rows.append({"job": r["job"], "step": int(r["step"]), "kind": r["kind"], "loss": float(r["loss"]),
                                 "wall_s": float(r["wall_s"])})  # fmt: skip
                except ValueError as exc:
                    raise InvalidInput(f"{log}: a row that is not numbers ({exc})") from exc
        if rows:
            logs.append(rows)
    if not logs:
        raise NotFound(f"{folder}: no {LOG} below it (run 'medbridge bench pretrain --out {folder}')")
    logs.sort(key=lambda rows: (rows[0]["step"], rows[0]["wall_s"]))
    return [r for rows in logs for r in rows]


def check(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Jobs in order, steps lost or repeated, and each resume's gap in step, wall time and validation loss."""
    jobs: list[str] = []
    for r in rows:
        if not jobs or jobs[-1] != r["job"]:
            jobs.append(r["job"])
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    top = max(steps, default=0)
    seen: dict[int, int] = {}
    for s in steps:
        seen[s] = seen.get(s, 0) + 1
    resumes: list[dict[str, Any]] = []
    for before, after in itertools.pairwise(jobs):
        last = [r for r in rows if r["job"] == before]
        first = [r for r in rows if r["job"] == after and r["kind"] == "resume"]
        end_val = [r for r in last if r["kind"] == "val"]
        if not first or not end_val:
            resumes.append({"from": before, "to": after, "resumed": False})
            continue
        a, b = end_val[-1], first[0]
        resumes.append({"from": before, "to": after, "resumed": True, "step_gap": b["step"] - last[-1]["step"],
                        "wall_gap_s": round(b["wall_s"] - a["wall_s"], 3),
                        "val_loss_before": a["loss"], "val_loss_after": b["loss"],
                        "val_loss_gap": round(abs(b["loss"] - a["loss"]), 8)})  # fmt: skip
    continuous = all(
        r["resumed"] and r["step_gap"] == 0 and r["val_loss_gap"] <= TOLERANCE * max(1.0, abs(r["val_loss_before"]))
        for r in resumes
    )
    lost = [s for s in range(1, top + 1) if s not in seen]
    repeated = sorted(s for s, n in seen.items() if n > 1)
    return {"jobs": jobs, "steps": top, "lost_steps": lost, "repeated_steps": repeated, "resumes": resumes,
            "continuous": continuous and not lost and not repeated,
            "val": [[r["wall_s"], r["loss"]] for r in rows if r["kind"] in ("val", "resume")],
            "final_val_loss": next((r["loss"] for r in reversed(rows) if r["kind"] == "val"), None)}  # fmt: skip


def plot(
    rows: Sequence[dict[str, Any]], path: Path, title: str = "pre-training: validation loss over wall time"
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(r["wall_s"] for r in rows)
    scale, unit = (3600.0, "h") if top > 7200 else (1.0, "s")
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    train = [r for r in rows if r["kind"] == "train"]
    val = [r for r in rows if r["kind"] in ("val", "resume")]
    ax.plot([r["wall_s"] / scale for r in train], [r["loss"] for r in train], color="#c0c0c0", lw=0.8,
            label="training loss (per step)")  # fmt: skip
    ax.plot([r["wall_s"] / scale for r in val], [r["loss"] for r in val], "o-", color="#4c72b0", ms=3,
            label="validation loss")  # fmt: skip
    for r in rows:
        if r["kind"] == "resume":
            ax.axvline(r["wall_s"] / scale, color="#dd8452", ls=":", lw=1)
    ax.set_xlabel(f"training wall time ({unit}); dotted: a job resumed from the last checkpoint")
    ax.set_ylabel("masked-volume L1")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
