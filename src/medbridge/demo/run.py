"""``medbridge demo``: platform, dataset, grant, a lung-segmentation job, teardown — and the record of it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from medbridge.config import Home
from medbridge.control.store import Store
from medbridge.demo import phantom
from medbridge.errors import JobFailed
from medbridge.ingest import nifti
from medbridge.platform.background import BackgroundPlatform
from medbridge.platform.keys import fingerprint, public_line
from medbridge.platform.storage import add_dataset, init_home
from medbridge.policy.manifest import RESULTS_MANIFEST

USER, GROUP, DATASET, JOB = "alice", "chest-society", "chest-ct", "demo-1"


def can_mount() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("sshfs") is not None and os.geteuid() == 0


def run_demo(volumes: int = 4, keep: bool = False, mount: bool | None = None) -> dict[str, Any]:
    """Run the whole story in a temporary folder on loopback; return what happened."""
    import asyncssh

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="medbridge-demo-"))
    use_mount = can_mount() if mount is None else mount
    try:
        home = Home(work / "platform")
        init_home(home, "demo")
        store = Store(home.database_url(home.settings()))
        now = datetime.now(UTC)
        key = asyncssh.generate_private_key("ssh-ed25519")
        key_file = work / "alice_enrolment"
        key_file.write_bytes(key.export_private_key())
        key_file.chmod(0o600)
        store.add_group(GROUP, now, "demo")
        store.add_user(USER, [(public_line(key), fingerprint(key))], [GROUP], now, "demo")
        incoming = work / "incoming"
        incoming.mkdir()
        for i in range(volumes):
            nifti.write(incoming / f"ct-{i + 1:03d}.nii", phantom.chest(seed=i + 1), phantom.SPACING)
        added, _ = add_dataset(home, store, DATASET, incoming, "Synthetic Chest Society", "demo")
        shutil.rmtree(incoming)
        store.grant(f"@{GROUP}", DATASET, now + timedelta(days=30), now, "demo")

        job_dir = work / "job"
        for sub in ("work", "tmp"):
            (job_dir / sub).mkdir(parents=True)
        outputs, report_file = job_dir / "outputs", job_dir / "report.json"
        with BackgroundPlatform(home) as bg:
            cmd = [sys.executable, "-m", "medbridge", "job", "run", "--platform", bg.address, "--key", str(key_file),
                   "--user", USER, "--job-id", JOB, "--host-key-fingerprint", bg.fingerprint, "--dataset", DATASET,
                   "--outputs", str(outputs), "--report", str(report_file), "--purge"]  # fmt: skip
            if use_mount:
                cmd += ["--mount", str(job_dir / "mnt")]
            cmd += ["--", sys.executable, "-m", "medbridge.demo.segment"]
            env = {**os.environ, "TMPDIR": str(job_dir / "tmp"), "MEDBRIDGE_DEMO_OUTPUTS": str(outputs),
                   "MEDBRIDGE_DEMO_DATASET": DATASET,
                   "MEDBRIDGE_DEMO_CACHE": str(job_dir / "tmp" / "cache")}  # fmt: skip
            proc = subprocess.run(cmd, cwd=job_dir / "work", env=env, capture_output=True, text=True, timeout=300)
            address, host_key = bg.address, bg.fingerprint
        if proc.returncode != 0 or not report_file.exists():
            raise JobFailed(f"the demo job failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
        job_report = json.loads(report_file.read_text())
        results = home.results_root(home.settings()) / USER / JOB
        summary = json.loads((results / "summary.json").read_text())
        audit = [r.as_dict() for r in store.audit_records() if _about_job(r.as_dict())]
        chain = store.verify_audit()
        store.close()
        return {
            "workdir": str(work) if keep else None,
            "platform": {"address": address, "host_key": host_key, "database": "SQLite", "storage": "local"},
            "dataset": {"name": DATASET, "files": added.files, "bytes": added.bytes,
                        "shape": list(phantom.SHAPE), "spacing_mm": list(phantom.SPACING)},
            "access": {"user": USER, "group": GROUP, "grant_until": (now + timedelta(days=30)).date().isoformat()},
            "job": {"id": JOB, "read_via": "sshfs mount" if use_mount else "the native loader (no FUSE here)",
                    "read_bytes": summary["read_bytes"], "volumes": summary["volumes"],
                    "exit_code": job_report["exit_code"], "certificate_serial": job_report["certificate_serial"]},
            "outputs": {"files": job_report["uploaded_files"], "bytes": job_report["uploaded_bytes"],
                        "on_platform": sorted(p.name for p in results.iterdir()),
                        "manifest_committed": (results / RESULTS_MANIFEST).exists()},
            "teardown": {"unmounted": job_report["unmounted"], "agent_stopped": job_report["agent_stopped"],
                         "residue": {k: job_report["residue"][k] for k in ("files_scanned", "clean", "findings")}},
            "audit": audit,
            "audit_chain_entries": chain,
            "seconds": round(time.monotonic() - started, 1),
        }  # fmt: skip
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _about_job(entry: dict[str, Any]) -> bool:
    detail = entry["detail"]
    return entry["subject"] == JOB or (isinstance(detail, dict) and detail.get("job") == JOB)
