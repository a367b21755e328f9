"""The compute node's other users: state files and the epilog's reading of them (replays of issue 14, item 7a).

Real Unix users, made here and removed by name: another user plants files in the shared
1733 state folder before the victim's job; the victim's job must write nothing into them,
and the epilog (root) must read only what the job's own user made, never through a link.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from medbridge.compute.slurm import epilog
from medbridge.compute.state import UserFolder
from medbridge.errors import InvalidInput
from medbridge.testing import RunningPlatform
from medbridge.testing.users import as_user, available, unix_user
from tests.compute.test_job_run import job_cmd, job_env
from tests.compute.test_residue import dicom

pytestmark = pytest.mark.skipif(available() is not None, reason=f"{available()}")


@pytest.fixture
def shared() -> Iterator[Path]:
    """A node folder others can reach (pytest's own temporary folder is root's alone), with a 1733 state folder."""
    base = Path(tempfile.mkdtemp(prefix="medbridge-node-", dir="/var/tmp"))
    base.chmod(0o755)
    (base / "state").mkdir(mode=0o1733)
    (base / "state").chmod(0o1733)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def attacker() -> Iterator[pwd.struct_passwd]:
    with unix_user("mbatk") as user:
        yield user


def as_attacker(attacker: pwd.struct_passwd, script: str) -> None:
    subprocess.run(["sh", "-c", script], check=True, timeout=30, **as_user(attacker))


def test_state_files_planted_by_another_user_get_nothing(
    platform: RunningPlatform, shared: Path, attacker: pwd.struct_passwd
) -> None:
    """Another user pre-creates the victim's 999.json and 999.manifest, mode 0666, in the shared state folder."""
    state = shared / "state"
    as_attacker(attacker, f"umask 0; : > {state}/999.json; : > {state}/999.manifest")
    own = state / str(os.getuid())
    seen = shared / "seen.txt"
    script = f'stat -c "%a %u %n" {own} {own}/999.json > {seen}'
    work = platform.root / "job" / "work"
    work.mkdir(parents=True)
    env = job_env(platform.root / "job", {"SLURM_JOB_ID": "999", "MEDBRIDGE_STATE_DIR": str(state)})
    r = subprocess.run(job_cmd(platform, script), capture_output=True, text=True, timeout=120, env=env, cwd=work)
    assert (state / "999.json").stat().st_size == 0, "the job wrote into a file another user made"
    assert (state / "999.manifest").stat().st_size == 0
    assert r.returncode == 0, r.stderr
    uid = os.getuid()
    assert seen.read_text().splitlines() == [f"700 {uid} {own}", f"600 {uid} {own}/999.json"]
    assert not (own / "999.json").exists(), "removed at teardown"


def test_a_state_folder_another_user_made_is_refused(shared: Path, attacker: pwd.struct_passwd) -> None:
    state = shared / "state"
    own = state / str(os.getuid())
    as_attacker(attacker, f"mkdir -m 777 {own}")
    with pytest.raises(InvalidInput, match=rf"{own} is owned by uid {attacker.pw_uid} \({attacker.pw_name}\), not you"):
        UserFolder.claim(state)
    os.rmdir(own)
    as_attacker(attacker, f"mkdir -m 777 {state}/theirs && ln -s {state}/theirs {own}")
    with pytest.raises(InvalidInput, match="is not a folder but a link"):
        UserFolder.claim(state)
    assert os.listdir(state / "theirs") == []
    os.unlink(own)
    os.mkdir(own, 0o700)
    os.chmod(own, 0o777)
    with pytest.raises(InvalidInput, match=r"is writable by others \(mode 0777\)"):
        UserFolder.claim(state)
    os.chmod(own, 0o755)
    folder = UserFolder.claim(state)
    try:
        assert folder.write("1.json", b"{}") == own / "1.json"
        assert folder.write("1.json", b"[]") == own / "1.json", "a leftover of our own is replaced"
        assert (own / "1.json").read_bytes() == b"[]" and (own / "1.json").stat().st_mode & 0o777 == 0o600
        assert own.stat().st_mode & 0o777 == 0o700
    finally:
        folder.close()


def test_the_epilog_reads_only_the_jobs_own_user_folder_and_no_link(
    shared: Path, attacker: pwd.struct_passwd, tmp_path: Path
) -> None:
    """Root's epilog for a job of uid 0: planted names around it are ignored; its own state is used."""
    state = shared / "state"
    job = str(secrets.randbelow(10**9) + 10**9)  # no Slurm job on this machine has it: the epilog kills none
    work = tmp_path / "work"
    work.mkdir()
    (work / "slice.dcm").write_bytes(dicom())
    planted = {"scan": ["/etc"], "scratch": ["/etc"], "started": 0}
    as_attacker(attacker, f"echo '{json.dumps(planted)}' > {state}/{job}.json; mkdir -m 755 {state}/{attacker.pw_uid}")
    folder = UserFolder.claim(state)
    try:
        folder.write(f"{job}.json", json.dumps({"scan": [str(work)], "scratch": [str(work)], "started": 0}).encode())
    finally:
        folder.close()
    report = epilog({"SLURM_JOB_ID": job, "SLURM_JOB_UID": "0"}, state, mounts=lambda uid: [])
    assert [Path(f["path"]).name for f in report.residue["findings"] if f["purged"]] == ["slice.dcm"]
    assert report.residue["roots"] == [str(work)]
    assert not (state / "0" / f"{job}.json").exists() and (state / f"{job}.json").exists(), "only its own removed"

    # The attacker's folder and a link in it: the epilog for the attacker's job reads neither.
    uid = attacker.pw_uid
    as_attacker(attacker, f"ln -s /etc/shadow {state}/{uid}/778.json; mkfifo {state}/{uid}/779.json")
    theirs = {"SLURM_JOB_UID": str(uid)}
    report = epilog({**theirs, "SLURM_JOB_ID": "778"}, state, mounts=lambda uid: [])
    assert report.residue == {} and any("778.json" in n for n in report.notes), report.notes
    report = epilog({**theirs, "SLURM_JOB_ID": "779"}, state, mounts=lambda uid: [])
    assert report.residue == {} and any("not a regular file" in n for n in report.notes), report.notes
    os.chmod(state / str(uid), 0o777)
    report = epilog({**theirs, "SLURM_JOB_ID": "778"}, state, mounts=lambda uid: [])
    assert any("writable by no one else" in n for n in report.notes), report.notes


def test_another_user_cannot_read_the_jobs_folders_while_it_runs(
    platform: RunningPlatform, shared: Path, attacker: pwd.struct_passwd
) -> None:
    """During the job another user tries its outputs, scratch, $TMPDIR and working folder (issue 14, item 7b)."""
    work, outputs, tmp = shared / "work", shared / "work" / "outputs", shared / "tmp"
    work.mkdir(mode=0o755)
    outputs.mkdir(mode=0o755)
    tmp.mkdir()
    tmp.chmod(0o1777)
    tries = shared / "tries.txt"
    attempt = (
        f'runuser -u {attacker.pw_name} -- sh -c \'cat "$1" || ls "$1"\' sh "$p" >/dev/null 2>&1; '
        f'echo "$? $p" >> {tries}'
    )
    script = (
        'mkdir -p outputs/masks && echo secret > outputs/masks/m.txt && echo s > "$MEDBRIDGE_SCRATCH/s.txt" && '
        'echo t > "$TMPDIR/t.txt" && echo w > w.txt && '
        'for p in outputs/masks/m.txt outputs "$MEDBRIDGE_SCRATCH/s.txt" "$TMPDIR/t.txt" "$TMPDIR" '
        f"{work} {work}/w.txt; do {attempt}; done"
    )
    (platform.root / "job").mkdir()
    env = job_env(platform.root / "job", {"TMPDIR": str(tmp)})
    cmd = job_cmd(platform, script, "--job-id", "priv", "--outputs", "outputs", "--scratch", ".")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=work)
    assert r.returncode == 0, r.stderr
    read = [line for line in tries.read_text().splitlines() if line.startswith("0 ")]
    assert len(tries.read_text().splitlines()) == 7 and read == [], f"another user read the job's files: {read}"
    assert (platform.home.results / "alice" / "priv" / "masks" / "m.txt").read_text() == "secret\n"
    assert work.stat().st_mode & 0o777 == 0o755 and outputs.stat().st_mode & 0o777 == 0o755, "modes given back"
