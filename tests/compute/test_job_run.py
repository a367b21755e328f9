"""``medbridge job run`` with stock OpenSSH clients inside the job: sftp and sshfs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from medbridge.compute.job import accepts_connections
from medbridge.testing import RunningPlatform
from tests.conftest import CHEST


def job_cmd(p: RunningPlatform, script: str, *extra: str, user: str = "alice", fingerprint: str = "") -> list[str]:
    return [
        sys.executable, "-m", "medbridge", "job", "run", "--platform", p.address, "--key", str(p.keys[user]),
        "--user", user, "--host-key-fingerprint", fingerprint or p.fingerprint, *extra, "--", "sh", "-c", script,
    ]  # fmt: skip


def job_env(tmp: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The job's environment: its own TMPDIR, never the repository as working folder."""
    (tmp / "jobtmp").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MEDBRIDGE_"))}
    return {**env, "TMPDIR": str(tmp / "jobtmp"), **(extra or {})}


def job_run(
    p: RunningPlatform,
    script: str,
    *extra: str,
    env: dict[str, str] | None = None,
    user: str = "alice",
    fingerprint: str = "",
) -> subprocess.CompletedProcess[str]:
    tmp = p.root / "job"
    tmp.mkdir(exist_ok=True)
    (tmp / "work").mkdir(exist_ok=True)
    return subprocess.run(
        job_cmd(p, script, *extra, user=user, fingerprint=fingerprint), capture_output=True, text=True,
        timeout=120, env=job_env(tmp, env), cwd=tmp / "work",
    )  # fmt: skip


def test_openssh_sftp_reads_a_granted_file_byte_identical(platform: RunningPlatform, tmp_path: Path) -> None:
    out = tmp_path / "copy.bin"
    batch = tmp_path / "batch"
    batch.write_text(f"get /datasets/chest/scan-001.bin {out}\nput {batch} /results/alice/j-sftp/batch.txt\n")
    r = job_run(platform, f'sftp -b {batch} -F "$MEDBRIDGE_SSH_CONFIG" "$MEDBRIDGE_SSH_HOST"', "--job-id", "j-sftp")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == CHEST["scan-001.bin"]
    assert (platform.home.results / "alice" / "j-sftp" / "batch.txt").read_text() == batch.read_text()


def test_job_environment_and_nothing_secret_on_disk(platform: RunningPlatform) -> None:
    script = (
        'echo "$MEDBRIDGE_USER $MEDBRIDGE_JOB_ID $MEDBRIDGE_PLATFORM"; echo "$SSH_AUTH_SOCK"; '
        'ls -A "$(dirname "$SSH_AUTH_SOCK")"; ssh-add -l'
    )
    r = job_run(platform, script, env={"SLURM_JOB_ID": "4242"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"alice 4242 {platform.address}"
    sock = Path(lines[1])
    assert sorted(lines[2:6]) == ["agent.sock", "known_hosts", "scratch", "ssh_config"]
    assert "ED25519-CERT" in lines[6]
    assert not sock.parent.exists(), "the job folder must be removed after the job"
    holders = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline(p).find(str(sock)) >= 0]
    assert holders == [], "the job's ssh-agent must be gone after the job"


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_payload_exit_code_passes_through(platform: RunningPlatform) -> None:
    assert job_run(platform, "exit 3").returncode == 3


def test_no_grant_refuses_before_the_payload_starts(platform: RunningPlatform, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    r = job_run(platform, f"touch {marker}", "--dataset", "knee")
    assert r.returncode == 6
    assert "no live grant" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()


def test_wrong_host_key_is_refused(platform: RunningPlatform, tmp_path: Path) -> None:
    r = job_run(platform, "true", fingerprint="SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
    assert r.returncode == 8
    assert "not the pinned" in r.stderr


@pytest.mark.fuse
@pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("sshfs") is None,
    reason="needs /dev/fuse and sshfs (apt-get install sshfs)",
)
def test_sshfs_mount_reads_a_granted_file_byte_identical(platform: RunningPlatform, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    copy = tmp_path / "copy.bin"
    script = (
        f'sshfs -F "$MEDBRIDGE_SSH_CONFIG" "$MEDBRIDGE_SSH_HOST":/ {mnt} -o ro && '
        f"ls {mnt}/datasets > {tmp_path}/listing && cp {mnt}/datasets/chest/scan-001.bin {copy}; "
        f"rc=$?; fusermount3 -u {mnt} || fusermount -u {mnt}; exit $rc"
    )
    try:
        r = job_run(platform, script)
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
    assert r.returncode == 0, r.stderr
    assert copy.read_bytes() == CHEST["scan-001.bin"]
    assert (tmp_path / "listing").read_text().split() == ["chest"]
    assert not os.path.ismount(mnt)


FSSPEC_PAYLOAD = """
import os, fsspec
with fsspec.open("medbridge://datasets/chest/scan-001.bin", "rb") as f:
    data = f.read()
fs = fsspec.filesystem("medbridge")
print(sorted(fs.ls("medbridge://datasets/chest", detail=False)))
with fsspec.open(os.environ["MEDBRIDGE_RESULTS_URL"] + "/masks/scan-001.mask", "wb") as out:
    out.write(data[::-1])
fs.get("medbridge://datasets/chest/scan-002.bin", os.environ["MEDBRIDGE_SCRATCH"] + "/copy.bin")
open("outputs/log.txt", "w").write("done")
"""


def test_fsspec_inside_job_run_reads_writes_and_commits_with_the_outputs(
    platform: RunningPlatform, tmp_path: Path
) -> None:
    """No import of medbridge in the payload: fsspec finds medbridge:// by its entry point."""
    (platform.root / "job" / "work" / "outputs").mkdir(parents=True, exist_ok=True)
    script = tmp_path / "payload.py"
    script.write_text(FSSPEC_PAYLOAD)
    r = job_run(platform, f"{sys.executable} {script}", "--job-id", "j-fs", "--outputs", "outputs")
    assert r.returncode == 0, r.stderr
    assert "'/datasets/chest/scan-001.bin'" in r.stdout
    results = platform.home.results / "alice" / "j-fs"
    assert (results / "masks" / "scan-001.mask").read_bytes() == CHEST["scan-001.bin"][::-1]
    committed = sorted(line.split("  ")[1] for line in (results / "MANIFEST.sha256").read_text().splitlines())
    assert committed == ["log.txt", "masks/scan-001.mask"]
    assert "2 output files" in r.stderr and "residue scan clean" in r.stderr


def test_the_agent_counts_as_started_only_once_it_listens(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    assert not accepts_connections(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        assert path.exists() and not accepts_connections(path), "bound, not yet listening: not started"
        server.listen()
        assert accepts_connections(path)
