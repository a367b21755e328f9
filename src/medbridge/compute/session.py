"""The job's own data session (certificate from its agent): manifests in, outputs out."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from medbridge.config import CIPHERS
from medbridge.errors import AccessDenied, InvalidInput, JobFailed, PlatformUnavailable
from medbridge.net import parse_address
from medbridge.policy.manifest import PARTIAL_SUFFIX, RESULTS_MANIFEST, format_manifest
from medbridge.processes import sha256_file


@dataclass(frozen=True)
class Endpoint:
    """Where the platform is and how the job reaches it."""

    host: str
    port: int
    user: str
    host_key: asyncssh.SSHKey
    agent: str


def endpoint_from_job(environ: Mapping[str, str]) -> Endpoint:
    """The job's data session from what ``job run`` put in the environment; nothing else to configure."""
    try:
        host, port = parse_address(environ["MEDBRIDGE_PLATFORM"], "MEDBRIDGE_PLATFORM")
        known = Path(environ["MEDBRIDGE_SSH_CONFIG"]).with_name("known_hosts").read_text().split()
        return Endpoint(
            host,
            port,
            environ["MEDBRIDGE_USER"],
            asyncssh.import_public_key(" ".join(known[1:3])),
            environ["SSH_AUTH_SOCK"],
        )
    except (KeyError, ValueError, OSError, IndexError, asyncssh.KeyImportError, InvalidInput) as exc:
        raise JobFailed(f"not inside 'medbridge job run' (job environment incomplete: {exc})") from exc


async def connect(
    ep: Endpoint, host: str | None = None, port: int | None = None, **options: Any
) -> asyncssh.SSHClientConnection:
    """Log in with exactly the certificates in the job's agent, pinning the platform.

    The agent is needed only while authenticating (its key pairs sign through it), so
    it is closed once the connection is up.  ``host``/``port`` reach the platform
    another way (a benchmark route); ``options`` go to asyncssh.
    """
    try:
        agent = await asyncssh.connect_agent(ep.agent)
        try:
            return await asyncssh.connect(
                host or ep.host,
                port or ep.port,
                username=ep.user,
                known_hosts=([ep.host_key], [], []),
                agent_path=None,
                client_keys=await agent.get_keys(),
                encryption_algs=list(CIPHERS),
                config=None,
                connect_timeout=30,
                **options,
            )
        finally:
            agent.close()
            await agent.wait_closed()
    except asyncssh.PermissionDenied as exc:
        raise AccessDenied(f"the platform refused the job's certificate (expired, revoked, job ended): {exc}") from exc
    except (OSError, asyncssh.Error) as exc:
        raise PlatformUnavailable(f"cannot open the job's data session: {exc}") from exc


@dataclass(frozen=True)
class Upload:
    files: int
    bytes: int
    manifest: str


async def upload_outputs(
    ep: Endpoint, job_id: str, outputs: Path | None, written: Sequence[tuple[str, str]] = ()
) -> Upload:
    """Upload every file under ``outputs`` to the job's results, then commit a manifest.

    Each file goes to a ``.medbridge-part`` name and is renamed into place when whole;
    the platform verifies the manifest against what it holds before accepting it.  An
    interrupted upload leaves no manifest, so it never looks complete; running it
    again finishes it.  ``written`` are ``(sha256, path)`` of results the payload already
    wrote to the platform (through ``medbridge://``): committed with the outputs, unless
    an output of the same name replaced them.
    """
    files = [] if outputs is None else sorted(p for p in outputs.rglob("*") if p.is_file() and not p.is_symlink())
    root = f"/results/{ep.user}/{job_id}"
    if not files and not written:
        return Upload(0, 0, "")
    entries = []
    total = 0
    try:
        async with await connect(ep) as conn, conn.start_sftp_client() as sftp:
            for path in files:
                assert outputs is not None
                rel = path.relative_to(outputs).as_posix()
                remote = posixpath.join(root, rel)
                parent = posixpath.dirname(remote)
                if parent != root:
                    await sftp.makedirs(parent, exist_ok=True)
                await sftp.put(str(path), remote + PARTIAL_SUFFIX)
                await sftp.posix_rename(remote + PARTIAL_SUFFIX, remote)
                entries.append((sha256_file(path), rel))
                total += path.stat().st_size
            uploaded = {rel for _, rel in entries}
            latest = {rel: sha for sha, rel in written}  # a result written twice: its last version
            entries += [(sha, rel) for rel, sha in latest.items() if rel not in uploaded]
            manifest = format_manifest(entries)
            staged = posixpath.join(root, RESULTS_MANIFEST + PARTIAL_SUFFIX)
            async with sftp.open(staged, "wb") as f:
                await f.write(manifest.encode())
            await sftp.posix_rename(staged, posixpath.join(root, RESULTS_MANIFEST))
    except (OSError, asyncssh.Error) as exc:
        raise JobFailed(
            f"uploading outputs to {root} failed: {exc}; run the job again with --job-id {job_id} "
            f"--outputs {outputs} to finish it"
        ) from exc
    return Upload(len(entries), total, manifest)


def wipe(outputs: Path) -> None:
    """Remove uploaded outputs from the node (they now live on the platform)."""
    for dirpath, dirnames, filenames in os.walk(outputs, topdown=False):
        for name in filenames:
            os.remove(os.path.join(dirpath, name))
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                os.remove(full)
            else:
                os.rmdir(full)
