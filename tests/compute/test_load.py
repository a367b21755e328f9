"""Load: 16 jobs of 8 users at once against one platform — no errors, and nothing of one user reaches another."""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from medbridge.testing import RunningPlatform

USERS = [f"u{i}" for i in range(1, 9)]
JOBS_PER_USER = 2
FILES, FILE_BYTES = 4, 1 << 20

#: Each job reads its user's dataset with the loader, tries every other user's dataset and results, and writes
#: what it saw; its token ties the output to the job that wrote it.
PAYLOAD = """
import hashlib, json, os, pathlib, sys, time
from medbridge.loader import Loader
user, job = os.environ["MEDBRIDGE_USER"], os.environ["MEDBRIDGE_JOB_ID"]
out = pathlib.Path(os.environ["OUT"]); out.mkdir(parents=True, exist_ok=True)
others = [u for u in sys.argv[1].split(",") if u != user]
with Loader() as loader:
    seen = loader.datasets()
    files = loader.files(f"ds-{user}")
    start, digests, total = time.perf_counter(), {}, 0
    for path, data in zip(files, loader.read_many(files)):
        digests[path] = hashlib.sha256(data).hexdigest()
        total += len(data)
    seconds = time.perf_counter() - start
    refused = {}
    for other in others:
        for path in (f"/datasets/ds-{other}/f0.bin", f"/results/{other}/{other}-a/result.json"):
            try:
                loader.read(path)
                refused[path] = "READ"
            except (PermissionError, FileNotFoundError) as exc:
                refused[path] = type(exc).__name__
(out / "token.bin").write_bytes(hashlib.sha256(job.encode()).digest() * 1024)
(out / "result.json").write_text(json.dumps({"user": user, "job": job, "seen": seen, "digests": digests,
                                             "bytes": total, "seconds": seconds, "refused": refused}))
"""


def test_sixteen_jobs_of_eight_users_at_once_keep_to_their_own(tmp_path: Path) -> None:
    p = RunningPlatform(tmp_path / "p", enforcement_interval=0.25)
    data: dict[str, dict[str, bytes]] = {}
    for user in USERS:
        p.add_user(user)
        data[user] = {f"f{i}.bin": os.urandom(FILE_BYTES) for i in range(FILES)}
        p.add_dataset(f"ds-{user}", data[user])
        p.grant(user, f"ds-{user}")
    script = tmp_path / "payload.py"
    script.write_text(PAYLOAD)
    with p:
        procs = {}
        started = time.monotonic()
        for n in range(JOBS_PER_USER):
            for user in USERS:
                job = f"{user}-{'ab'[n]}"
                work = tmp_path / job
                work.mkdir()
                env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDBRIDGE_", "SLURM_"))}
                env.update(OUT=str(work / "out"), TMPDIR=str(work))
                cmd = [sys.executable, "-m", "medbridge", "job", "run", "--platform", p.address, "--key",
                       str(p.keys[user]), "--user", user, "--host-key-fingerprint", p.fingerprint, "--job-id", job,
                       "--outputs", str(work / "out"), "--", sys.executable, str(script), ",".join(USERS)]  # fmt: skip
                procs[job] = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.PIPE, text=True)  # fmt: skip
        errors = {job: proc.communicate(timeout=300)[1] for job, proc in procs.items()}
        wall = time.monotonic() - started
        failed = {job: err for job, err in errors.items() if procs[job].returncode != 0}
        assert not failed, failed
        rates = []
        for job in procs:
            user = job.split("-")[0]
            results = p.home.results / user / job
            assert sorted(x.name for x in results.iterdir()) == ["MANIFEST.sha256", "result.json", "token.bin"]
            assert (results / "token.bin").read_bytes() == hashlib.sha256(job.encode()).digest() * 1024
            r = json.loads((results / "result.json").read_text())
            assert (r["user"], r["job"], r["seen"]) == (user, job, [f"ds-{user}"])
            assert r["digests"] == {f"/datasets/ds-{user}/{name}": hashlib.sha256(b).hexdigest()
                                    for name, b in data[user].items()}  # fmt: skip
            assert set(r["refused"].values()) <= {"PermissionError", "FileNotFoundError"}, r["refused"]
            assert len(r["refused"]) == 2 * (len(USERS) - 1)
            rates.append(r["bytes"] / r["seconds"] / 1e6)
        for user in USERS:  # every results folder of a user holds only that user's jobs
            assert sorted(x.name for x in (p.home.results / user).iterdir()) == [f"{user}-a", f"{user}-b"]
        everything = {b for files in data.values() for b in files.values()}
        for out in p.home.results.rglob("*"):
            if out.is_file():
                assert out.read_bytes() not in everything, f"{out} holds a dataset file"
        logins = [r for r in p.audit("login") if r.subject == "certificate"]
        assert {json.loads(r.detail)["job"] for r in logins} >= set(procs)
    print(f"\n{len(procs)} jobs of {len(USERS)} users in {wall:.1f} s; per-job read MB/s "
          f"min {min(rates):.1f} median {statistics.median(rates):.1f} max {max(rates):.1f}")  # fmt: skip
