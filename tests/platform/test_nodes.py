"""Compute nodes as principals (issue 14, item 9b): a node's epilog ends the jobs placed on it, and nothing else."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from medbridge.control.store import Store
from medbridge.errors import AlreadyExists, InvalidInput
from medbridge.platform.issuer import END_JOB_COMMAND, ISSUE_COMMAND
from medbridge.platform.keys import KEY_ALG, fingerprint, public_line
from medbridge.policy.nodes import NodeFact, Placement, jobs_to_end, may_log_in
from medbridge.testing import RunningPlatform, write_key
from tests.conftest import CHEST


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[RunningPlatform, dict[str, asyncssh.SSHKey]]]:
    """alice may read chest; node n1 logs in from 127.0.0.1, n2 from 127.0.0.2, far from 10.9.9.9."""
    p = RunningPlatform(tmp_path, enforcement_interval=0.25)
    p.add_user("alice")
    p.add_dataset("chest", CHEST)
    p.grant("alice", "chest")
    keys = {}
    for name, address in (("n1", "127.0.0.1"), ("n2", "127.0.0.2/32"), ("far", "10.9.9.9")):
        keys[name] = write_key(tmp_path / f"{name}_node")
        p.store.add_node(name, (public_line(keys[name]), fingerprint(keys[name])), [address], _now(), "test")
    with p:
        yield p, keys


def _now() -> datetime:
    return datetime.now(UTC)


async def as_node(
    p: RunningPlatform, name: str, key: asyncssh.SSHKey, command: str, body: Any, source: str = "127.0.0.1"
) -> tuple[int, dict[str, Any], str]:
    """Run one command as node ``name`` connecting from ``source``: (exit code, reply, stderr)."""
    async with asyncssh.connect(p.host, p.port, username=f"node:{name}", client_keys=[key], known_hosts=None,
                                agent_path=None, config=None, local_addr=(source, 0)) as conn:  # fmt: skip
        # A refused command gets no input: the platform answers before reading any.
        done = await conn.run(command, input=None if body is None else json.dumps(body).encode(), encoding=None)
        return done.exit_status or 0, json.loads(done.stdout or b"{}"), (done.stderr or b"").decode()


async def logs_in(p: RunningPlatform, key: asyncssh.SSHKey, cert: asyncssh.SSHCertificate) -> bool:
    try:
        async with await p.connect("alice", [(key, cert)]):
            return True
    except asyncssh.PermissionDenied:
        return False


def test_a_node_ends_only_the_jobs_placed_from_its_address(
    nodes: tuple[RunningPlatform, dict[str, asyncssh.SSHKey]],
) -> None:
    p, keys = nodes
    k1, c1 = asyncio.run(p.credential("alice", job_id="j1", slurm_job_id="41"))
    k2, c2 = asyncio.run(p.credential("alice", job_id="j2", slurm_job_id="42"))
    code, reply, _ = asyncio.run(as_node(p, "n2", keys["n2"], END_JOB_COMMAND, {"slurm_job_id": "41"}, "127.0.0.2"))
    assert (code, reply["jobs"]) == (0, []), "job 41 asked for its certificates from 127.0.0.1, not n2's address"
    assert asyncio.run(logs_in(p, k1, c1.certificate))
    code, reply, _ = asyncio.run(as_node(p, "n1", keys["n1"], END_JOB_COMMAND, {"slurm_job_id": "41"}))
    assert (code, reply["jobs"]) == (0, [{"user": "alice", "job_id": "j1", "revoked": 1}])
    assert not asyncio.run(logs_in(p, k1, c1.certificate)), "an ended job's certificate never logs in again"
    assert asyncio.run(logs_in(p, k2, c2.certificate)), "another Slurm job on the node goes on"
    ends = [r for r in p.audit("job.end") if r.actor == "node:n1"]
    assert [(r.subject, json.loads(r.detail)["slurm_job_id"]) for r in ends] == [("j1", "41")]
    calls = p.audit("node.end-job")
    assert [(r.actor, r.outcome, r.subject) for r in calls] == [("node:n2", "ok", "41"), ("node:n1", "ok", "41")]


def test_a_node_credential_opens_nothing_else(nodes: tuple[RunningPlatform, dict[str, asyncssh.SSHKey]]) -> None:
    p, keys = nodes
    code, _, err = asyncio.run(as_node(p, "n1", keys["n1"], ISSUE_COMMAND, None))
    assert code == 126 and "a node may only end its jobs" in err
    code, reply, _ = asyncio.run(as_node(p, "n1", keys["n1"], END_JOB_COMMAND, {"slurm_job_id": "../x"}))
    assert code == 2 and reply["type"] == "InvalidInput"
    code, reply, _ = asyncio.run(as_node(p, "n1", keys["n1"], END_JOB_COMMAND, {"slurm_job_id": "41", "user": "bob"}))
    assert code == 2, "the node names the Slurm job and nothing else"

    async def sftp_as_node() -> None:
        login = {"username": "node:n1", "client_keys": [keys["n1"]], "known_hosts": None, "agent_path": None}
        async with asyncssh.connect(p.host, p.port, config=None, **login) as conn, conn.start_sftp_client() as sftp:
            await sftp.listdir("/datasets")

    with pytest.raises(asyncssh.SFTPError):
        asyncio.run(sftp_as_node())
    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(as_node(p, "far", keys["far"], END_JOB_COMMAND, {"slurm_job_id": "41"}))
    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(as_node(p, "n2", keys["n1"], END_JOB_COMMAND, {"slurm_job_id": "41"}, "127.0.0.2"))
    alice = asyncssh.read_private_key(str(p.keys["alice"]))
    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(as_node(p, "n1", alice, END_JOB_COMMAND, {"slurm_job_id": "41"}))

    async def alice_ends() -> int:
        async with await p.connect("alice", [alice]) as conn:
            done = await conn.run(END_JOB_COMMAND, encoding=None)
            return done.exit_status or 0

    assert asyncio.run(alice_ends()) == 126, "an enrolment key cannot end jobs"
    refused = p.audit("login", until=lambda r: "logs in only from 10.9.9.9/32" in r.detail)
    assert any("logs in only from 10.9.9.9/32, not from 127.0.0.1" in r.detail for r in refused)
    assert any('"session":"node"' in r.detail for r in p.audit("command.refused"))
    assert [r.outcome for r in p.audit("node.end-job")] == ["refused", "refused"]
    with pytest.raises(AlreadyExists, match="already enrolled for user 'alice'"):
        p.store.add_node("n9", (public_line(alice), fingerprint(alice)), ["127.0.0.1"], _now(), "test")


def test_node_policy_is_pure() -> None:
    node = NodeFact(name="n1", fingerprint="f", networks=("10.1.0.0/24",))
    placed = [
        Placement(user="alice", job_id="j1", slurm_job_id="7", address="10.1.0.5"),
        Placement(user="bob", job_id="j9", slurm_job_id="7", address="10.2.0.5"),
        Placement(user="carol", job_id="j2", slurm_job_id="8", address="10.1.0.5"),
        Placement(user="alice", job_id="j1", slurm_job_id="7", address="10.1.0.6"),
    ]
    assert jobs_to_end(node, "7", placed) == [("alice", "j1")]
    assert may_log_in(node, "10.1.0.9") is None
    assert "only from 10.1.0.0/24" in str(may_log_in(node, "10.1.1.9"))
    assert may_log_in(node, "not-an-ip") is not None
    with pytest.raises(InvalidInput):
        Store.__new__(Store).add_node("n", ("k", "f"), [], _now(), "t")


def test_each_node_of_a_job_of_several_nodes_ends_its_own_platform_job(
    nodes: tuple[RunningPlatform, dict[str, asyncssh.SSHKey]],
) -> None:
    """A two-node Slurm job 43 runs platform jobs 43-n0 (from n1) and 43-n1 (from n2): each epilog ends its own."""
    p, keys = nodes

    async def ask(job_id: str, source: str) -> None:
        key = asyncssh.read_private_key(str(p.keys["alice"]))
        async with await p.connect("alice", [key], local_addr=(source, 0)) as conn:
            ephemeral = asyncssh.generate_private_key(KEY_ALG)
            request = {"public_key": ephemeral.export_public_key().decode(), "job_id": job_id, "lifetime": 600,
                       "datasets": None, "slurm_job_id": "43"}  # fmt: skip
            done = await conn.run(ISSUE_COMMAND, input=json.dumps(request).encode(), encoding=None)
            assert done.exit_status == 0, done.stdout

    asyncio.run(ask("43-n0", "127.0.0.1"))
    asyncio.run(ask("43-n1", "127.0.0.2"))
    code, reply, _ = asyncio.run(as_node(p, "n1", keys["n1"], END_JOB_COMMAND, {"slurm_job_id": "43"}))
    assert (code, [j["job_id"] for j in reply["jobs"]]) == (0, ["43-n0"])
    code, reply, _ = asyncio.run(as_node(p, "n2", keys["n2"], END_JOB_COMMAND, {"slurm_job_id": "43"}, "127.0.0.2"))
    assert (code, [j["job_id"] for j in reply["jobs"]]) == (0, ["43-n1"])
    assert {r.subject for r in p.audit("job.end")} == {"43-n0", "43-n1"}
