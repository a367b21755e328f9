"""The job-certificate issuer: an enrolment key buys a short certificate for an ephemeral key.

Also the other commands a non-certificate session may run: a job's last word (its
residue report, recorded as the job's claim, and that it ended), and a compute node's
one command, ending the jobs placed on it (policy.nodes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncssh

from medbridge.config import PlatformSettings
from medbridge.control.audit import AuditEvent
from medbridge.control.store import Store
from medbridge.errors import InvalidInput, MedbridgeError
from medbridge.platform.keys import fingerprint
from medbridge.platform.metrics import error_code, process_metrics
from medbridge.policy.credentials import CertificateSpec, IssuanceLimits
from medbridge.policy.nodes import NodeFact, check_slurm_job

#: The one command an enrolment-key session may run.
ISSUE_COMMAND = "medbridge-issue-certificate"
#: The job wrapper reports its residue scan with the enrolment key (its certificate is gone by then).
REPORT_COMMAND = "medbridge-report-residue"
#: A compute node's one command (its epilog): end the jobs placed on it as one Slurm job.
END_JOB_COMMAND = "medbridge-end-slurm-job"
#: Outages a job may report (each one audit row); what each may say.
MAX_OUTAGES = 50
OUTAGE_FIELDS = ("started", "seconds", "beyond", "how", "tolerance", "still")
#: A job's residue report is its own word: recorded as what the job claims, never as a fact the platform checked.
RESIDUE_REPORTED = "residue.reported"
#: What one claim may hold: findings kept, the length of each text in them, the claim's whole JSON.
MAX_CLAIMED_FINDINGS = 50
MAX_CLAIMED_TEXT = 512
MAX_CLAIM_BYTES = 8192
#: Requests beyond this are clamped before any arithmetic (the platform maximum applies anyway).
MAX_REQUESTED_LIFETIME = 10 * 366 * 24 * 3600
MAX_REQUEST = 64 * 1024
#: The residue scan asks which of its candidate files' hashes are dataset files (no manifest leaves the platform).
LOOKUP_COMMAND = "medbridge-residue-lookup"
MAX_LOOKUP = 10_000
#: Bytes read from a command's input, per command (a lookup carries up to MAX_LOOKUP hashes).
REQUEST_LIMITS = {LOOKUP_COMMAND: 80 * MAX_LOOKUP}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def parse_request(raw: bytes) -> tuple[asyncssh.SSHKey, str, timedelta, list[str] | None, str | None]:
    """Read ``{"public_key", "job_id", "lifetime", "datasets"[, "slurm_job_id"]}``; nothing else is accepted."""
    try:
        req = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"certificate request is not JSON: {exc}") from exc
    if not isinstance(req, dict):
        raise InvalidInput("certificate request must be a JSON object")
    allowed = {"public_key", "job_id", "lifetime", "datasets", "slurm_job_id"}
    extra = sorted(set(req) - allowed)
    if extra:
        raise InvalidInput(
            f"certificate request has unknown field(s) {', '.join(extra)}; "
            f"the platform alone decides principals, options and extensions"
        )
    try:
        key = asyncssh.import_public_key(str(req["public_key"]))
    except (KeyError, asyncssh.KeyImportError, ValueError) as exc:
        raise InvalidInput("certificate request needs a valid OpenSSH public_key") from exc
    job_id, lifetime, datasets = req.get("job_id"), req.get("lifetime"), req.get("datasets")
    if not isinstance(job_id, str):
        raise InvalidInput("certificate request needs a job_id string")
    if not isinstance(lifetime, int) or isinstance(lifetime, bool):
        raise InvalidInput("certificate request needs an integer lifetime in seconds")
    lifetime = min(lifetime, MAX_REQUESTED_LIFETIME)
    if datasets is not None and not (isinstance(datasets, list) and all(isinstance(d, str) for d in datasets)):
        raise InvalidInput("datasets must be a list of names or null")
    slurm_job = req.get("slurm_job_id")
    return key, job_id, timedelta(seconds=lifetime), datasets, None if slurm_job is None else check_slurm_job(slurm_job)


class Issuer:
    """Signs job certificates with the platform's user CA, as policy decides."""

    def __init__(self, store: Store, ca_key: asyncssh.SSHKey, settings: PlatformSettings):
        self._store = store
        self._ca = ca_key
        self._settings = settings

    @property
    def ca_public(self) -> asyncssh.SSHKey:
        return self._ca.convert_to_public()

    def issue(
        self, user: str, raw_request: bytes, peer: Mapping[str, Any], now: datetime | None = None
    ) -> dict[str, Any]:
        """Answer one request; refusals raise and are audited with their reason."""
        now = now or datetime.now(UTC)
        job_id: str | None = None
        try:
            key, job_id, lifetime, datasets, slurm_job = parse_request(raw_request)

            def sign(spec: CertificateSpec) -> asyncssh.SSHCertificate:
                return self._ca.generate_user_certificate(
                    key,
                    spec.key_id,
                    serial=spec.serial,
                    principals=list(spec.principals),
                    valid_after=int(spec.valid_after.timestamp()),
                    valid_before=int(spec.valid_before.timestamp()),
                    source_address=list(spec.source_addresses) or None,
                    permit_x11_forwarding=False,
                    permit_agent_forwarding=False,
                    permit_port_forwarding=False,
                    permit_pty=False,
                    permit_user_rc=False,
                )

            spec, cert = self._store.issue_certificate(
                user=user,
                job_id=job_id,
                requested=lifetime,
                datasets=datasets,
                key_fingerprint=fingerprint(key),
                now=now,
                max_lifetime=timedelta(seconds=self._settings.max_certificate_lifetime),
                source_addresses=self._settings.certificate_source_addresses,
                sign=sign,
                limits=IssuanceLimits(
                    rate=self._settings.certificate_rate_limit,
                    window=timedelta(seconds=self._settings.certificate_rate_window),
                    live_per_job=self._settings.max_live_certificates_per_job,
                ),
                placement=None if slurm_job is None else (slurm_job, address(peer)),
            )
        except MedbridgeError as exc:
            process_metrics().refused("certificate.issue", error_code(exc))
            self._store.audit(
                [
                    AuditEvent(
                        actor=user,
                        action="certificate.issue",
                        outcome="refused",
                        subject=job_id or "",
                        detail={"reason": str(exc), **peer},
                    )
                ],
                now,
            )
            raise
        self._store.audit(
            [
                AuditEvent(
                    actor=user,
                    action="certificate.issue",
                    outcome="ok",
                    subject=spec.job_id,
                    detail={
                        "serial": spec.serial,
                        "key_id": spec.key_id,
                        "valid_before": spec.valid_before.isoformat(),
                        "datasets": spec.datasets,
                        **peer,
                    },
                )
            ],
            now,
        )
        process_metrics().certificate(renewal=self._store.job_certificates(user, spec.job_id) > 1)
        return {
            "certificate": cert.export_certificate().decode().strip(),
            "serial": spec.serial,
            "key_id": spec.key_id,
            "user": spec.user,
            "job_id": spec.job_id,
            "valid_after": spec.valid_after.isoformat(),
            "valid_before": spec.valid_before.isoformat(),
            "datasets": spec.datasets,
            "outage_tolerance": self._settings.outage_tolerance,
        }

    def lookup(self, user: str, raw: bytes, peer: Mapping[str, Any], now: datetime | None = None) -> dict[str, Any]:
        """Which of a job's candidate hashes are files of a dataset it may read or its certificates named.

        Answers ``{"known": {sha256: "dataset/path"}}``; the residue scan holds no manifest.
        Asking needs a certificate of that job (the same rule as the report); each ask is audited.
        """
        now = now or datetime.now(UTC)
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInput(f"lookup is not JSON: {exc}") from exc
        hashes = body.get("sha256") if isinstance(body, dict) else None
        job_id = body.get("job_id") if isinstance(body, dict) else None
        if not isinstance(job_id, str) or not isinstance(hashes, list) or len(hashes) > MAX_LOOKUP:
            raise InvalidInput(f"a lookup needs a job_id and a list of at most {MAX_LOOKUP} sha256 values")
        if not all(isinstance(h, str) and _SHA256.fullmatch(h) for h in hashes):
            raise InvalidInput("a lookup's sha256 values must be 64 lowercase hex digits")
        if not any(c.job_id == job_id for c in self._store.certificates(user)):
            raise InvalidInput(f"user {user!r} has no certificate for job {job_id!r}")
        found = self._store.find_hashes(user, job_id, hashes, now)
        self._store.audit([AuditEvent(actor=user, action="residue.lookup", outcome="ok", subject=job_id,
                                      detail={"asked": len(hashes), "known": len(found), **peer})], now)  # fmt: skip
        return {"known": {sha: f"{ds}/{path}" for sha, (ds, path) in found.items()}}

    def report(self, user: str, raw: bytes, peer: Mapping[str, Any], now: datetime | None = None) -> dict[str, Any]:
        """A job's last word: its residue scan (if it ran one), and that it ended.

        Ending a job revokes all its certificates, so no session opened during the job
        (an escaped process, a forgotten mount) outlives it.
        """
        now = now or datetime.now(UTC)
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInput(f"job report is not JSON: {exc}") from exc
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("job_id"), str)
            or not isinstance(body.get("report"), dict)
        ):
            raise InvalidInput("job report needs a job_id and a report object")
        job_id, report = body["job_id"], body["report"]
        if not any(c.job_id == job_id for c in self._store.certificates(user)):
            raise InvalidInput(f"user {user!r} has no certificate for job {job_id!r}")
        if report:
            claim = residue_claim(report)
            outcome = "claims-residue" if not claim["clean"] else "claims-purged" if claim["found"] else "claims-clean"
            detail = {"source": "job", "claim": claim, **peer}
            event = AuditEvent(actor=user, action=RESIDUE_REPORTED, outcome=outcome, subject=job_id, detail=detail)
            self._store.audit([event], now)
        reported = body.get("outages")
        outages: list[Any] = reported if isinstance(reported, list) else []
        events = [
            AuditEvent(actor=user, action="job.outage", outcome="beyond_tolerance" if o.get("beyond") else "survived",
                       subject=job_id, detail={"source": "job", **_outage_detail(o), **peer})
            for o in outages[:MAX_OUTAGES]
            if isinstance(o, dict)
        ]  # fmt: skip
        if events:
            self._store.audit(events, now)
        revoked = self._store.end_job(user, job_id, now, user) if body.get("ended") else 0
        return {"recorded": True, "revoked": revoked}

    def end_slurm_job(
        self, node: NodeFact, raw: bytes, peer: Mapping[str, Any], now: datetime | None = None
    ) -> dict[str, Any]:
        """A node's epilog: end the jobs placed from the node as this Slurm job (``{"slurm_job_id"}``)."""
        now = now or datetime.now(UTC)
        slurm_job = ""
        try:
            try:
                body = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise InvalidInput(f"end request is not JSON: {exc}") from exc
            if not isinstance(body, dict) or set(body) != {"slurm_job_id"}:
                raise InvalidInput('an end request is {"slurm_job_id": "<digits>"} and nothing else')
            slurm_job = check_slurm_job(body["slurm_job_id"])
            ended = self._store.end_slurm_job(node, slurm_job, now, dict(peer))
        except MedbridgeError as exc:
            event = AuditEvent(actor=f"node:{node.name}", action="node.end-job", outcome="refused",
                               subject=slurm_job, detail={"reason": str(exc), **peer})  # fmt: skip
            self._store.audit([event], now)
            raise
        event = AuditEvent(actor=f"node:{node.name}", action="node.end-job", outcome="ok", subject=slurm_job,
                           detail={"jobs": ended, **peer})  # fmt: skip
        self._store.audit([event], now)
        return {"slurm_job_id": slurm_job, "jobs": ended}


def address(peer: Mapping[str, Any]) -> str:
    """The client's IP address from a connection's ``peer`` (``HOST:PORT``, as the server records it)."""
    return str(peer.get("peer", "")).rpartition(":")[0]


def residue_claim(report: Mapping[str, Any]) -> dict[str, Any]:
    """What a job says of its residue scan: known fields only, every text and list bounded.

    The counts are the job's (never fewer than the findings it lists); the findings it
    names are kept while the claim's JSON fits :data:`MAX_CLAIM_BYTES`.
    """
    findings = report.get("findings")
    listed = [f for f in findings if isinstance(f, dict)] if isinstance(findings, list) else []
    roots = report.get("roots")
    kept = [
        {
            "path": _claimed_text(f.get("path")),
            "reason": _claimed_text(f.get("reason")),
            "why": _claimed_text(f.get("why")),
            "purged": f.get("purged") is True,
            "size": _count(f.get("size")),
        }
        for f in listed[:MAX_CLAIMED_FINDINGS]
    ]
    claim: dict[str, Any] = {
        "clean": report.get("clean") is True,
        "files_scanned": _count(report.get("files_scanned")),
        "found": max(len(listed), _count(report.get("found"))),
        "purged": max(sum(1 for f in listed if f.get("purged") is True), _count(report.get("purged"))),
        "preexisting": _count(report.get("preexisting_found")),
        "roots": [_claimed_text(r) for r in roots[:16]] if isinstance(roots, list) else [],
        "findings": kept,
    }
    while kept and len(json.dumps(claim)) > MAX_CLAIM_BYTES:
        del kept[len(kept) // 2 :]
    claim["findings_recorded"] = len(kept)
    return claim


def _claimed_text(value: object) -> str:
    return value[:MAX_CLAIMED_TEXT] if isinstance(value, str) else ""


def _count(value: object) -> int:
    """A count from a job's report: a non-negative int, else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _outage_detail(reported: dict[str, Any]) -> dict[str, Any]:
    """What a job said about one outage, kept only where it is a number, a flag or a short word."""
    kept: dict[str, Any] = {}
    for key in OUTAGE_FIELDS:
        value = reported.get(key)
        if isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 64):
            kept[key] = value
    return kept
