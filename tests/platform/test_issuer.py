"""The issuer under an enrolment key in hostile hands (issue 14, item 8): how many certificates it signs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncssh

from medbridge.platform.issuer import ISSUE_COMMAND, MAX_CLAIM_BYTES, MAX_REQUEST, REPORT_COMMAND, RESIDUE_REPORTED
from medbridge.platform.keys import KEY_ALG
from medbridge.testing import RunningPlatform
from tests.conftest import CHEST


async def ask_many(p: RunningPlatform, user: str, jobs: list[str]) -> list[tuple[int, dict[str, object]]]:
    """One certificate request per job id, all over one enrolment-key connection: (exit code, reply) each."""
    key = asyncssh.read_private_key(str(p.keys[user]))
    replies = []
    async with await p.connect(user, [key]) as conn:
        for job in jobs:
            ephemeral = asyncssh.generate_private_key(KEY_ALG)
            request = {"public_key": ephemeral.export_public_key().decode(), "job_id": job, "lifetime": 86400,
                       "datasets": None}  # fmt: skip
            done = await conn.run(ISSUE_COMMAND, input=json.dumps(request).encode(), encoding=None)
            replies.append((done.exit_status or 0, json.loads(done.stdout or b"{}")))
    return replies


def test_certificate_issuance_is_rate_limited_per_user_and_capped_per_job(tmp_path: Path) -> None:
    """The issue's attack: 100 certificates at the maximum lifetime over one connection in 1.6 s."""
    p = RunningPlatform(tmp_path, certificate_rate_limit=10, certificate_rate_window=3600,
                        max_live_certificates_per_job=3)  # fmt: skip
    for user in ("alice", "bob"):
        p.add_user(user)
    p.add_dataset("chest", CHEST)
    p.grant("alice", "chest")
    p.grant("bob", "chest")
    with p:
        flood = asyncio.run(ask_many(p, "alice", [f"job-{i}" for i in range(100)]))
        same_job = asyncio.run(ask_many(p, "bob", ["one-job"] * 4))
        audited = p.audit("certificate.issue", until=lambda r: "max_live_certificates_per_job" in r.detail)
    signed = [reply for code, reply in flood if code == 0]
    refused = [(code, reply) for code, reply in flood if code != 0]
    assert len(signed) == 10 and all("certificate" in r for r in signed)
    assert len(refused) == 90
    assert all(code == 6 and reply["type"] == "LimitReached" for code, reply in refused)
    assert "certificate_rate_limit = 10" in str(refused[0][1]["error"])
    assert [code for code, _ in same_job] == [0, 0, 0, 6]
    assert "max_live_certificates_per_job = 3" in str(same_job[-1][1]["error"])
    refusals = [r for r in audited if r.outcome == "refused"]
    assert sum("certificate_rate_limit" in r.detail for r in refusals if r.actor == "alice") == 90
    assert any("max_live_certificates_per_job" in r.detail for r in refusals if r.actor == "bob")
    assert len(p.store.certificates("alice")) == 10


def test_a_forged_residue_report_is_recorded_as_the_jobs_claim_and_bounded(platform: RunningPlatform) -> None:
    """The issue's probe: a report saying "clean" and "/etc/shadow purged", sent with the enrolment key."""
    asyncio.run(platform.credential("alice", job_id="f1"))
    shadow = {"path": "/etc/shadow", "reason": "x" * 5000, "why": "trust me", "purged": True, "size": 7, "evil": 1}
    findings = [shadow] + [{"path": f"/data/{i}.dcm" + "p" * 150, "purged": True} for i in range(250)]
    report = {"clean": True, "files_scanned": 10**15, "found": 1, "purged": 1, "findings": findings,
              "roots": ["/"] * 100, "verified_by": "platform"}  # fmt: skip
    body = json.dumps({"job_id": "f1", "report": report, "ended": False}).encode()
    assert len(body) < MAX_REQUEST

    async def send() -> int:
        key = asyncssh.read_private_key(str(platform.keys["alice"]))
        async with await platform.connect("alice", [key]) as conn:
            done = await conn.run(REPORT_COMMAND, input=body, encoding=None)
            return done.exit_status or 0

    assert asyncio.run(send()) == 0
    recorded = platform.audit(RESIDUE_REPORTED)
    assert [(r.actor, r.outcome, r.subject) for r in recorded] == [("alice", "claims-purged", "f1")]
    detail = json.loads(recorded[0].detail)
    assert detail["source"] == "job" and "verified_by" not in detail["claim"]
    claim = detail["claim"]
    assert claim["findings"][0] == {"path": "/etc/shadow", "reason": "x" * 512, "why": "trust me", "purged": True,
                                    "size": 7}  # fmt: skip
    assert claim["found"] == 251 and claim["findings_recorded"] == len(claim["findings"]) < 251
    assert len(json.dumps(claim)) <= MAX_CLAIM_BYTES and len(claim["roots"]) == 16
    assert platform.audit("residue.scan") == [], "nothing a job says is recorded as the platform's own finding"
