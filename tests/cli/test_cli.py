"""The CLI end to end in subprocesses: exit codes, one-line errors, nothing lost on bad input."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from medbridge.testing import write_key
from medbridge.testing.wait import HANG


def mb(*args: str, home: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MEDBRIDGE_HOME"}
    if home is not None:
        env["MEDBRIDGE_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "medbridge", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("medbridge: error:")
    return lines[0]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    r = mb("platform", "init", "--home", str(h))
    assert r.returncode == 0, r.stderr
    assert "SHA256:" in r.stdout
    write_key(tmp_path / "alice")
    write_key(tmp_path / "bob")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.bin").write_bytes(os.urandom(1000))
    return h


def test_admin_flow_and_json_listings(home: Path, tmp_path: Path) -> None:
    assert mb("group", "add", "society", home=home).returncode == 0
    r = mb("user", "add", "alice", "--key", str(tmp_path / "alice.pub"), "--group", "society", home=home)
    assert r.returncode == 0, r.stderr
    assert (
        mb("dataset", "add", "chest", "--from", str(tmp_path / "data"), "--provider", "soc", home=home).returncode == 0
    )
    assert mb("grant", "@society", "chest", "--until", "2999-01-01", home=home).returncode == 0
    datasets = json.loads(mb("dataset", "list", "--json", home=home).stdout)["datasets"]
    assert [(d["name"], d["files"], d["bytes"]) for d in datasets] == [("chest", 1, 1000)]
    grants = json.loads(mb("grants", "--json", home=home).stdout)["grants"]
    assert grants == [{"subject": "@society", "dataset": "chest", "until": "2999-01-02T00:00:00+00:00"}]
    users = json.loads(mb("user", "list", "--json", home=home).stdout)["users"]
    assert users[0]["name"] == "alice" and users[0]["groups"] == ["society"]
    manifest = mb("dataset", "manifest", "chest", home=home).stdout
    check = subprocess.run(["sha256sum", "-c"], input=manifest, text=True, capture_output=True, cwd=tmp_path / "data")
    assert check.returncode == 0, check.stdout + check.stderr
    assert mb("revoke", "@society", "chest", home=home).returncode == 0
    actions = [e["action"] for e in json.loads(mb("audit", "--json", home=home).stdout)["entries"]]
    assert actions == ["platform.init", "group.add", "user.add", "dataset.add", "grant", "revoke"]
    about = mb("audit", "--json", "--dataset", "chest", "--since", "2000-01-01", "--last", "2", home=home).stdout
    assert [(e["action"], e["dataset"]) for e in json.loads(about)["entries"]] == [
        ("grant", "chest"),
        ("revoke", "chest"),
    ]
    assert mb("audit", "verify", home=home).returncode == 0


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["grant", "nobody", "chest"], 4, "no such user"),
        (["revoke", "alice", "chest"], 4, "no grant"),
        (["grant", "alice", "nothing"], 4, "no such dataset"),
        (["user", "disable", "nobody"], 4, "no such user"),
        (["user", "add", "carol", "--key", "{tmp}/missing.pub"], 2, "cannot read key file"),
        (["user", "add", "carol", "--key", "{tmp}/alice"], 2, "private key"),
        (["user", "add", "alice", "--key", "{tmp}/bob.pub"], 5, "already exists"),
        (["user", "add", "carol", "--key", "{tmp}/bob.pub", "--group", "nope"], 4, "no such group"),
        (["user", "add", "bad/name", "--key", "{tmp}/alice.pub"], 2, "invalid user name"),
        (["user", "add", "carol", "--key", "{tmp}/alice.pub"], 5, "already enrolled"),
        (["dataset", "add", "x", "--from", "{tmp}/nope"], 2, "not a directory"),
        (["dataset", "add", "chest", "--from", "{tmp}/data"], 5, "already exists"),
        (["grant", "alice", "chest", "--until", "2001-01-01"], 2, "already past"),
        (["grant", "alice", "chest", "--until", "soon"], 2, "YYYY-MM-DD"),
        (["group", "add", "society"], 5, "already exists"),
        (["platform", "init"], 5, "already a platform home"),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(
    home: Path, tmp_path: Path, args: list[str], code: int, words: str
) -> None:
    assert mb("group", "add", "society", home=home).returncode == 0
    assert mb("user", "add", "alice", "--key", str(tmp_path / "alice.pub"), home=home).returncode == 0
    assert mb("dataset", "add", "chest", "--from", str(tmp_path / "data"), home=home).returncode == 0
    before = mb("audit", "--json", home=home).stdout
    r = mb(*[a.replace("{tmp}", str(tmp_path)) for a in args], home=home)
    assert r.returncode == code, r.stderr
    assert words in one_line_error(r)
    assert mb("audit", "--json", home=home).stdout == before
    assert sorted(p.name for p in (home / "storage" / "datasets").iterdir()) == ["chest"]


def test_dataset_with_symlink_is_refused_whole(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "linked"
    src.mkdir()
    (src / "ok.bin").write_bytes(b"fine")
    (src / "link").symlink_to("/etc/passwd")
    r = mb("dataset", "add", "linked", "--from", str(src), home=home)
    assert r.returncode == 2
    assert "symbolic links" in one_line_error(r)
    assert list((home / "storage" / "datasets").iterdir()) == []
    assert json.loads(mb("dataset", "list", "--json", home=home).stdout)["datasets"] == []


def test_home_not_initialised(tmp_path: Path) -> None:
    r = mb("dataset", "list", "--home", str(tmp_path / "nothing"))
    assert r.returncode == 3
    assert "not initialised" in one_line_error(r)


def test_tampered_audit_entry_is_detected(home: Path, tmp_path: Path) -> None:
    assert mb("user", "add", "alice", "--key", str(tmp_path / "alice.pub"), home=home).returncode == 0
    assert mb("group", "add", "society", home=home).returncode == 0
    assert mb("audit", "verify", home=home).returncode == 0
    db = sqlite3.connect(home / "control.db")
    with db:
        db.execute("UPDATE audit SET subject = 'mallory' WHERE seq = 2")
    db.close()
    r = mb("audit", "verify", home=home)
    assert r.returncode == 7
    assert "broken at entry 2" in one_line_error(r)


def test_deleted_audit_entry_is_detected(home: Path, tmp_path: Path) -> None:
    assert mb("user", "add", "alice", "--key", str(tmp_path / "alice.pub"), home=home).returncode == 0
    assert mb("group", "add", "society", home=home).returncode == 0
    db = sqlite3.connect(home / "control.db")
    with db:
        db.execute("DELETE FROM audit WHERE seq = 2")
    db.close()
    r = mb("audit", "verify", home=home)
    assert r.returncode == 7
    assert "entry 2 is missing" in one_line_error(r)


def test_a_published_anchor_catches_a_cut_end_and_verify_can_start_from_it(home: Path, tmp_path: Path) -> None:
    assert mb("user", "add", "alice", "--key", str(tmp_path / "alice.pub"), home=home).returncode == 0
    r = mb("audit", "anchor", "--out", str(tmp_path / "anchor.json"), "--json", home=home)
    assert r.returncode == 0, r.stderr
    anchored = json.loads(r.stdout)
    assert json.loads((tmp_path / "anchor.json").read_text())["seq"] == anchored["seq"] == 2
    assert (home / "audit-anchor.json").read_text() == (tmp_path / "anchor.json").read_text()
    assert mb("group", "add", "society", home=home).returncode == 0
    r = mb("audit", "verify", "--from", str(tmp_path / "anchor.json"), "--json", home=home)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["entries_checked"] == 2, "the checkpoint and the group, nothing before the anchor"
    db = sqlite3.connect(home / "control.db")
    with db:
        db.execute("DELETE FROM audit WHERE seq >= 2")
    db.close()
    assert mb("audit", "verify", home=home).returncode == 0, "the chain alone cannot tell its end was cut"
    r = mb("audit", "verify", "--anchor", str(tmp_path / "anchor.json"), home=home)
    assert r.returncode == 7
    assert "the chain ends at entry 1 but an anchor names entry 2 (the end was cut)" in one_line_error(r)


def test_serve_reports_port_in_use(home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = mb("platform", "serve", "--listen", f"127.0.0.1:{port}", home=home)
    assert r.returncode == 8
    assert "address already in use" in one_line_error(r)


def test_serve_prints_its_address_and_stops_on_sigterm(home: Path) -> None:
    env = {**os.environ, "MEDBRIDGE_HOME": str(home)}
    cmd = [sys.executable, "-m", "medbridge", "platform", "serve", "--listen", "127.0.0.1:0", "--workers", "1"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "listening on 127.0.0.1:" in line and "SHA256:" in line
            port = int(line.split("127.0.0.1:")[1].split()[0])
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                assert s.recv(64).startswith(b"SSH-2.0-")
            proc.terminate()
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    actions = [e["action"] for e in json.loads(mb("audit", "--json", home=home).stdout)["entries"]]
    assert actions[-4:] == ["platform.start", "login", "platform.stop", "audit.checkpoint"], "the bare probe too"


def test_workers_share_one_port_and_each_enforces_revocation(home: Path, tmp_path: Path) -> None:
    """Two server processes on one port; sessions on both end when the grant is revoked."""
    import asyncio

    from medbridge.compute.credentials import Enrolment, request_certificate

    (tmp_path / "data" / "b.bin").write_bytes(b"x" * 10)
    assert mb("user", "add", "alice", "--key", str(tmp_path / "alice.pub"), home=home).returncode == 0
    assert mb("dataset", "add", "chest", "--from", str(tmp_path / "data"), home=home).returncode == 0
    assert mb("grant", "alice", "chest", home=home).returncode == 0
    (home / "platform.toml").write_text("enforcement_interval = 0.25\n")
    env = {**os.environ, "MEDBRIDGE_HOME": str(home)}
    cmd = [sys.executable, "-m", "medbridge", "platform", "serve", "--listen", "127.0.0.1:0", "--workers", "2"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "(2 workers)" in line
            port = int(line.split("127.0.0.1:")[1].split()[0])
            fpr = line.split("host key ")[1].split()[0]

            async def sessions() -> list[str]:
                import asyncssh as a

                key = a.read_private_key(str(tmp_path / "alice"))
                conns = []
                for i in range(8):
                    eph = a.generate_private_key("ssh-ed25519")
                    cred = await request_certificate(Enrolment("127.0.0.1", port, "alice", key, fpr), eph, f"j{i}",
                                                     600, None)  # fmt: skip
                    conn = await a.connect("127.0.0.1", port, username="alice", known_hosts=None, config=None,
                                           client_keys=[(eph, cred.certificate)])  # fmt: skip
                    sftp = await conn.start_sftp_client()
                    assert await sftp.exists("/datasets/chest/b.bin")
                    conns.append((conn, sftp))
                assert mb("revoke", "alice", "chest", home=home).returncode == 0
                ended = []
                for conn, _sftp in conns:  # each worker's enforcement closes its own sessions
                    try:
                        await asyncio.wait_for(conn.wait_closed(), HANG)
                        ended.append("ended")
                    except TimeoutError:
                        ended.append("alive")
                    conn.close()
                return ended

            assert asyncio.run(sessions()) == ["ended"] * 8
        finally:
            proc.terminate()
            assert proc.wait(timeout=30) == 0
    starts = [e for e in json.loads(mb("audit", "--json", home=home).stdout)["entries"]
              if e["action"] == "platform.start"]  # fmt: skip
    assert len({e["detail"]["pid"] for e in starts}) == 2, "two worker processes"
    logins = [e for e in json.loads(mb("audit", "--json", home=home).stdout)["entries"]
              if e["action"] == "login" and e["subject"] == "certificate"]  # fmt: skip
    assert len(logins) == 8
    assert mb("audit", "verify", home=home).returncode == 0, "one chain, written by both workers"


@pytest.mark.parametrize(
    ("option", "kind", "words"),
    [("--mount", "file", "is a file"), ("--outputs", "file", "is a file"), ("--report", "folder", "is a directory")],
)
def test_job_run_names_a_file_given_for_a_folder_and_back(tmp_path: Path, option: str, kind: str, words: str) -> None:
    """Before, these reached the job and ended as "internal error" after it had started."""
    given = tmp_path / "given"
    given.mkdir() if kind == "folder" else given.write_text("mine")
    r = mb("job", "run", "--platform", "127.0.0.1:9", "--key", str(tmp_path / "none"), "--host-key-fingerprint",
           "SHA256:x", option, str(given), "--", "true")  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"Invalid value for '{option}'" in r.stderr and words in r.stderr
    assert given.is_dir() if kind == "folder" else given.read_text() == "mine", "left as it was"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--until", "9999-12-31"], "use YYYY-MM-DD or an ISO 8601 time"),
        (["--since", "0001-01-01T00:00+01:00"], "use YYYY-MM-DD or an ISO 8601 time"),
        (["--last", "99999999999999999999"], "is not in the range"),
        (["--user", "al\udcffice"], "--user: not UTF-8 text"),
    ],
)
def test_audit_filters_out_of_range_are_one_line_errors(home: Path, args: list[str], words: str) -> None:
    """The hostile review: each of these was an "internal error" (an overflow, a SQL statement, an encoding)."""
    r = mb("audit", *args, home=home)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert words in r.stderr.strip().splitlines()[-1], "the last line says what is wrong"
