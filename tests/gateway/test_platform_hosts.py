"""Two platform hosts behind the gateway, on one PostgreSQL and one shared home (medbridge.testing.deployment).

Jobs run at ``hpc`` and reach the hosts ``platform`` and ``platform2`` through the
gateway's backend list (round robin, a refusing backend skipped).  Each host's audit
entries name the gateway's side of that host's link as ``via``, which tells the hosts
apart here.  The home is one folder both namespaces see, standing in for the site's
shared file system; PostgreSQL is a private server (its Unix socket is seen by both).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from medbridge.control.audit import Record
from medbridge.testing.deployment import Deployment, wait_for
from medbridge.testing.netns import Sites, available, with_hosts
from medbridge.testing.postgres import PostgresServer, bindir
from tests.conftest import CHEST, KNEE

pytestmark = [
    pytest.mark.skipif(available() is not None, reason=f"no network namespaces here: {available()}"),
    pytest.mark.skipif(bindir() is None, reason="PostgreSQL is not installed (scripts/setup installs it)"),
]

#: Revocation reaches every host's sessions within this (enforcement_interval 0.25 s, as in test_enforcement).
BOUND = 3.0
#: Small files whose reads both hosts audit at once.
MANY = {f"f{i:03d}.bin": os.urandom(1024) for i in range(120)}
PLACES = ("platform", "platform2")
#: Sessions per user (max_sessions_per_user): the loader's four and job run's own fit.
LIMIT = 6


@pytest.fixture(scope="module")
def hosts(postgres: PostgresServer | None) -> Iterator[Deployment]:
    root = Path(tempfile.mkdtemp(prefix="medbridge-hosts-", dir="/var/tmp"))
    with _server(postgres) as server:
        sites = Sites(with_hosts(2)).start()
        try:
            h = Deployment(sites, root, server.database(), enforcement_interval=0.25, max_sessions_per_user=LIMIT)
            try:
                for user in ("alice", "bob"):
                    h.home.add_user(user)
                h.home.add_dataset("chest", CHEST)
                h.home.add_dataset("knee", KNEE)
                h.home.add_dataset("many", MANY)
                for user, dataset in (("alice", "chest"), ("alice", "knee"), ("alice", "many"), ("bob", "chest")):
                    h.home.grant(user, dataset)
                yield h.start()
            finally:
                h.stop()
        finally:
            sites.stop()
            shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _server(shared: PostgresServer | None) -> Iterator[PostgresServer]:
    """The session's PostgreSQL under ``--database postgresql``, else a private one for this module."""
    if shared is not None:
        yield shared
        return
    with PostgresServer() as own:
        yield own


def run_job(h: Deployment, user: str, script: str, *args: str, options: tuple[str, ...] = (),
            timeout: float = 180) -> subprocess.CompletedProcess[str]:  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="work-", dir=h.root))
    (work / "payload.py").write_text(script)
    cmd = h.job_command(user, [sys.executable, str(work / "payload.py"), *args], *options)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=work,
                          env=h.job_environment(work))  # fmt: skip


def start_job(h: Deployment, user: str, script: str, *args: str,
              options: tuple[str, ...] = ()) -> subprocess.Popen[str]:  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="work-", dir=h.root))
    (work / "payload.py").write_text(script)
    cmd = h.job_command(user, [sys.executable, str(work / "payload.py"), *args], *options)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=work,
                            env=h.job_environment(work))  # fmt: skip


def detail(r: Record) -> dict[str, object]:
    d = json.loads(r.detail)
    assert isinstance(d, dict)
    return d


def host_of(h: Deployment, r: Record) -> str:
    """Which host wrote an entry: the one whose link its ``via`` came through."""
    via = str(detail(r).get("via", ""))
    return next((p for p in PLACES if via.startswith(h.via(p) + ":")), "?")


def logins(h: Deployment, job: str) -> list[Record]:
    return [r for r in h.home.audit("login") if r.subject == "certificate" and detail(r).get("job") == job]


ISSUE_AND_LOG_IN = """\
import asyncio, json, os, sys
import asyncssh
from medbridge.compute.credentials import Enrolment, request_certificate
from medbridge.config import CIPHERS
from medbridge.net import parse_address

async def main():
    host, port = parse_address(os.environ["MEDBRIDGE_PLATFORM"])
    enrol = Enrolment(host, port, os.environ["MEDBRIDGE_USER"], asyncssh.read_private_key(sys.argv[1]), sys.argv[2])
    serials = []
    for _ in range(2):  # issue, log in, log in: through a round robin of two, each round starts on the other host
        key = asyncssh.generate_private_key("ssh-ed25519")
        cred = await request_certificate(enrol, key, os.environ["MEDBRIDGE_JOB_ID"], 600, None)
        for _ in range(2):
            async with asyncssh.connect(host, port, username=cred.user, client_keys=[(key, cred.certificate)],
                                        known_hosts=([cred.host_key], [], []), agent_path=None, config=None,
                                        encryption_algs=list(CIPHERS)) as conn:
                async with conn.start_sftp_client() as sftp:
                    assert (await sftp.stat("/datasets/chest/scan-001.bin")).size == 200_000
        serials.append(cred.serial)
    print(json.dumps(serials))

asyncio.run(main())
"""


def test_any_host_issues_certificates_that_every_host_accepts(hosts: Deployment) -> None:
    r = run_job(hosts, "alice", ISSUE_AND_LOG_IN, str(hosts.home.keys["alice"]), hosts.fingerprint,
                options=("--job-id", "issue-1"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    serials = json.loads(r.stdout.strip().splitlines()[-1])
    issued = {detail(e)["serial"]: host_of(hosts, e) for e in hosts.home.audit("certificate.issue")
              if e.outcome == "ok" and e.subject == "issue-1"}  # fmt: skip
    assert {issued[s] for s in serials} == set(PLACES), f"each host issued one of them: {issued}"
    used: dict[object, set[str]] = {}
    for e in logins(hosts, "issue-1"):
        used.setdefault(detail(e)["serial"], set()).add(host_of(hosts, e))
    for serial in serials:
        assert used[serial] == set(PLACES), f"certificate {serial} logged in on both hosts: {used}"


HOLD_TWO_SESSIONS = """\
import asyncio, os, pathlib, sys
import asyncssh
from medbridge.compute.session import connect, endpoint_from_job

async def main():
    ep = endpoint_from_job(os.environ)
    conns = [await connect(ep) for _ in range(2)]  # one on each host: the gateway takes turns
    clients = [await c.start_sftp_client() for c in conns]
    for s in clients:
        await s.stat("/datasets/knee/knee-001.bin")
    pathlib.Path(sys.argv[1]).write_text("connected")

    async def until_ended(s):
        while True:
            try:
                await s.stat("/datasets/knee/knee-001.bin")
            except (asyncssh.Error, OSError):
                return
            await asyncio.sleep(0.05)

    await asyncio.wait_for(asyncio.gather(*(until_ended(s) for s in clients)), 120)
    print("ended")

asyncio.run(main())
"""


def test_revoking_on_one_host_ends_the_sessions_on_every_host(hosts: Deployment) -> None:
    flag = hosts.root / "revoke-connected"
    job = start_job(hosts, "alice", HOLD_TWO_SESSIONS, str(flag), options=("--job-id", "revoke-1", "--dataset", "knee"))
    try:
        wait_for(flag.exists, "two sessions", proc=job)
        assert {host_of(hosts, e) for e in logins(hosts, "revoke-1")} == set(PLACES)
        revoke = hosts.sites.exec("platform2", sys.executable, "-m", "medbridge", "revoke", "alice", "knee",
                                  "--home", str(hosts.home.home.root))  # fmt: skip
        assert revoke.returncode == 0, revoke.stderr
        out, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
        hosts.home.grant("alice", "knee")
    assert job.returncode == 0, err
    assert out.strip().endswith("ended")
    revoked_at = [e for e in hosts.home.audit("revoke") if e.subject == "knee"][-1].at
    ends = {host_of(hosts, e): e for e in hosts.home.audit("session.end") if detail(e).get("job") == "revoke-1"}
    assert set(ends) == set(PLACES), ends
    for place, e in ends.items():
        assert "grant ended for dataset(s) knee" in str(detail(e)["reason"]), e
        assert (e.at - revoked_at).total_seconds() < BOUND, f"{place} ended its session {e.at - revoked_at} after"


READ_ALL = """\
import sys
from medbridge.loader import Loader

with Loader(connections=4) as loader:
    paths = loader.files("many")
    total = sum(len(b) for b in loader.read_many(paths))
print(len(paths), total)
"""


def test_two_hosts_append_to_one_audit_chain(hosts: Deployment) -> None:
    r = run_job(hosts, "alice", READ_ALL, options=("--job-id", "chain-1"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(len(MANY)), str(len(MANY) * 1024)]
    reads = [e for e in hosts.home.audit("sftp.read") if detail(e).get("job") == "chain-1"]
    by_host = [host_of(hosts, e) for e in sorted(reads, key=lambda e: e.seq)]
    assert set(by_host) == set(PLACES)
    switches = sum(1 for a, b in itertools.pairwise(by_host) if a != b)
    assert switches >= 2, "both hosts appended while the other did: their entries interleave in one order"
    verify = subprocess.run([sys.executable, "-m", "medbridge", "audit", "verify", "--home",
                             str(hosts.home.home.root)], capture_output=True, text=True)  # fmt: skip
    assert verify.returncode == 0, verify.stderr + verify.stdout
    seqs = [e.seq for e in hosts.home.audit()]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "one sequence, no gaps"


SESSIONS_UNTIL_REFUSED = """\
import asyncio, os
import asyncssh
from medbridge.compute.session import connect, endpoint_from_job
from medbridge.errors import MedbridgeError

async def main():
    ep = endpoint_from_job(os.environ)
    held = []
    for _ in range(8):
        try:
            conn = await connect(ep)
            sftp = await conn.start_sftp_client()
            await sftp.stat("/datasets/chest/scan-001.bin")
        except (MedbridgeError, asyncssh.Error, OSError) as exc:
            print("refused after", len(held), type(exc).__name__)
            return
        held.append(conn)
    print("never refused", len(held))

asyncio.run(main())
"""


def test_sessions_per_user_are_counted_over_every_host(hosts: Deployment) -> None:
    """Counted per host, eight sessions would fit (four on each); counted over both, the limit of six stops them."""
    r = run_job(hosts, "bob", SESSIONS_UNTIL_REFUSED, options=("--job-id", "slots-1"))
    assert r.returncode == 0, r.stderr
    words = r.stdout.split()
    assert words[:2] == ["refused", "after"], r.stdout
    assert LIMIT - 2 <= int(words[2]) <= LIMIT, "job run's own connection to the issuer may hold one place"
    assert {host_of(hosts, e) for e in logins(hosts, "slots-1")} == set(PLACES), "the sessions were on both hosts"
    refused = [e for e in hosts.home.audit("login") if e.outcome == "refused" and e.actor == "bob"]
    assert any("max_sessions_per_user" in str(detail(e).get("reason", "")) for e in refused)


READ_UNTIL_A_HOST_DIES = """\
import hashlib, json, pathlib, sys, time
from medbridge.loader import Loader

flag, said = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
with Loader(connections=2, patience=120) as loader:
    paths = loader.files("many")
    first = {p: hashlib.sha256(b).hexdigest() for p, b in zip(paths, loader.read_many(paths))}
    said.write_text("read once")
    while not flag.exists():
        time.sleep(0.05)
    second = {p: hashlib.sha256(b).hexdigest() for p, b in zip(paths, loader.read_many(paths))}
    print(json.dumps({"same": first == second, "files": len(second), "reconnects": loader.stats.reconnects}))
"""


def kill_a_host_mid_job(hosts: Deployment, script: str, job_id: str, *options: str,
                       pick: Callable[[set[str]], str]) -> tuple[str, set[str], str]:  # fmt: skip
    """Run ``script`` until it has read once, SIGKILL the host ``pick`` chooses among those serving the job, let it
    read again; restart the host.  Returns the job's output, the hosts that served its first pass, and the victim."""
    flag, said = hosts.root / f"{job_id}-go", hosts.root / f"{job_id}-said"
    job = start_job(hosts, "alice", script, str(flag), str(said), options=("--job-id", job_id, *options))
    victim = ""
    try:
        wait_for(said.exists, "the first pass", proc=job)
        serving = {host_of(hosts, e) for e in logins(hosts, job_id)}
        victim = pick(serving)
        hosts.stop_platform(signal.SIGKILL, victim)
        flag.touch()
        out, err = job.communicate(timeout=180)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
        if victim:
            hosts.start_platform(victim)
    assert job.returncode == 0, err
    return out, serving, victim


def sessions_after(hosts: Deployment, job_id: str, after: Record) -> set[str]:
    """The hosts the job logged in to after ``after`` (the victim's last entry) was written."""
    return {host_of(hosts, e) for e in logins(hosts, job_id) if e.seq > after.seq}


def last_of(hosts: Deployment, place: str) -> Record:
    return [e for e in hosts.home.audit() if host_of(hosts, e) == place][-1]


def test_a_host_that_dies_mid_job_is_skipped_and_the_loader_carries_on(hosts: Deployment) -> None:
    marks: dict[str, Record] = {}

    def pick(serving: set[str]) -> str:
        assert serving == set(PLACES), "the loader's two connections are on both hosts"
        marks["before"] = last_of(hosts, "platform2")
        return "platform2"

    out, _, _ = kill_a_host_mid_job(hosts, READ_UNTIL_A_HOST_DIES, "dies-1", pick=pick)
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {"same": True, "files": len(MANY), "reconnects": result["reconnects"]}
    assert result["reconnects"] >= 1, "the connection to the dead host was replaced"
    assert sessions_after(hosts, "dies-1", marks["before"]) == {"platform"}, "new sessions go to the live host"


READ_THROUGH_THE_MOUNT = """\
import hashlib, json, os, pathlib, sys, time

flag, said = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
root = pathlib.Path(os.environ["MEDBRIDGE_MOUNT"]) / "datasets" / "many"
names = sorted(n for n in os.listdir(root) if not n.startswith("."))

def one_pass():
    sums, failed = {}, []
    for name in names:
        try:
            sums[name] = hashlib.sha256((root / name).read_bytes()).hexdigest()
        except OSError as exc:
            failed.append(f"{name}: {exc}")
    return sums, failed

first, _ = one_pass()
said.write_text("read once")
while not flag.exists():
    time.sleep(0.05)
second, failed = one_pass()
if failed:  # what sshfs does with the first operations after its connection died
    second, _ = one_pass()
print(json.dumps({"same": first == second, "files": len(second), "failed": failed}))
"""


def test_a_host_that_dies_under_an_sshfs_mount(hosts: Deployment) -> None:
    mount = hosts.root / "mnt-dies-2"
    marks: dict[str, Record] = {}

    def pick(serving: set[str]) -> str:
        victim = sorted(serving)[0]  # a host sshfs reads from
        marks["before"] = last_of(hosts, victim)
        return victim

    out, _, victim = kill_a_host_mid_job(hosts, READ_THROUGH_THE_MOUNT, "dies-2", "--mount", str(mount), pick=pick)
    result = json.loads(out.strip().splitlines()[-1])
    after = sessions_after(hosts, "dies-2", marks["before"])
    # docs/platform-operator-guide.md says what sshfs did: which reads failed once, if any, before it reconnected
    print(f"sshfs after {victim} died: reconnected to {sorted(after)}; reads that failed: {result['failed']}")
    assert after == set(PLACES) - {victim}, "sshfs reconnected through the gateway to the live host"
    assert result["same"] and result["files"] == len(MANY)
    assert not os.path.ismount(mount)
