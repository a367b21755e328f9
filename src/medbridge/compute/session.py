"""The job's own data session (certificate from its agent): manifests in, outputs out."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import posixpath
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from medbridge import outage
from medbridge.config import CIPHERS
from medbridge.errors import AccessDenied, InvalidInput, JobFailed, PlatformUnavailable
from medbridge.net import parse_address
from medbridge.policy.credentials import REFUSED_BANNER
from medbridge.policy.manifest import PARTIAL_SUFFIX, RESULTS_MANIFEST, format_manifest


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


class PlatformSays(asyncssh.SSHClient):
    """What the platform told one connection: why it refused the certificate, and why it ended.

    A refusal's reason comes in an authentication banner; a session the platform
    ends on policy grounds is a disconnect that asyncssh raises as ``PermissionDenied``
    (its channels are closed just before, so their own error cannot tell it from a cut).
    """

    def __init__(self) -> None:
        self.refusal = ""
        self.ended = asyncio.Event()
        self.ended_by: Exception | None = None

    def auth_banner_received(self, msg: str, lang: str) -> None:
        if msg.startswith(REFUSED_BANNER):
            self.refusal = msg.removeprefix(REFUSED_BANNER).strip()

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended_by = exc
        self.ended.set()


async def connect(
    ep: Endpoint, host: str | None = None, port: int | None = None, **options: Any
) -> asyncssh.SSHClientConnection:
    """Log in with exactly the certificates in the job's agent, pinning the platform."""
    conn, _ = await connect_watched(ep, host, port, **options)
    return conn


async def connect_watched(
    ep: Endpoint, host: str | None = None, port: int | None = None, **options: Any
) -> tuple[asyncssh.SSHClientConnection, PlatformSays]:
    """:func:`connect`, and what the platform says to the connection (why it ends).

    The agent is needed only while authenticating (its key pairs sign through it), so
    it is closed once the connection is up.  ``host``/``port`` reach the platform
    another way (a benchmark route); ``options`` go to asyncssh.  A refused
    certificate is :class:`AccessDenied` naming the platform's reason.
    """
    options.setdefault("connect_timeout", 30)
    says = PlatformSays()
    try:
        agent = await asyncssh.connect_agent(ep.agent)
        try:
            conn = await asyncssh.connect(
                host or ep.host,
                port or ep.port,
                username=ep.user,
                known_hosts=([ep.host_key], [], []),
                agent_path=None,
                client_keys=await agent.get_keys(),
                encryption_algs=list(CIPHERS),
                config=None,
                client_factory=lambda: says,
                **options,
            )
        finally:
            agent.close()
            await agent.wait_closed()
    except asyncssh.PermissionDenied as exc:
        why = says.refusal or f"expired, revoked or the job ended ({exc.reason})"
        raise AccessDenied(f"the platform refused the job's certificate: {why}") from exc
    except (OSError, asyncssh.Error) as exc:
        raise PlatformUnavailable(f"cannot open the job's data session: {exc}") from exc
    return conn, says


@dataclass(frozen=True)
class Upload:
    files: int
    bytes: int
    manifest: str
    committed: bool = True
    attempts: int = 1
    #: Each uploaded local file with its identity (device, inode, size, mtime) when read: what :func:`wipe` may remove.
    sent: dict[Path, tuple[int, int, int, int]] = field(default_factory=dict)


#: Attempts that reach the platform and still move no byte before an upload gives up (a server that keeps
#: dropping it); attempts that cannot reach the platform are bounded by the outage tolerance instead.
MAX_FRUITLESS = 3


async def upload_outputs(
    ep: Endpoint,
    job_id: str,
    outputs: Path | None,
    written: Sequence[tuple[str, str]] = (),
    *,
    tolerance: float = outage.DEFAULT_TOLERANCE,
    commit: bool = True,
) -> Upload:
    """Upload every file under ``outputs`` to the job's results, then commit a manifest (if ``commit``).

    Each file goes to a ``.medbridge-part`` name and is renamed into place when whole;
    the platform verifies the manifest against what it holds before accepting it.  A
    dropped link is waited out for up to ``tolerance`` seconds without progress, and the
    upload goes on from the first file not yet in place.  An upload that still fails
    leaves no manifest, so it never looks complete; running the job again finishes it.
    ``written`` are ``(sha256, path)`` of results the payload already wrote to the
    platform (through ``medbridge://``): committed with the outputs, unless an output
    of the same name replaced them.
    """
    files = [] if outputs is None else sorted(p for p in outputs.rglob("*") if p.is_file() and not p.is_symlink())
    root = f"/results/{ep.user}/{job_id}"
    for path in files:
        try:
            os.fsencode(path).decode("utf-8")
        except UnicodeDecodeError:
            assert outputs is not None
            name = os.fsencode(path.relative_to(outputs)).decode("utf-8", "backslashreplace")
            raise JobFailed(f"uploading outputs to {root} refused: the output file name {name!r} is not UTF-8 "
                            "(the platform keeps UTF-8 names only); rename it and run the job again with "
                            f"--job-id {job_id} --outputs {outputs}") from None  # fmt: skip
    if not files and not written:
        return Upload(0, 0, "", committed=False)
    placed: dict[str, str] = {}  # relative path -> SHA-256, for files renamed into place
    sent: dict[Path, tuple[int, int, int, int]] = {}
    total = 0
    keepalive = outage.client_keepalive(tolerance)
    progress = time.monotonic()
    attempts = fruitless = 0

    def moved(*_: object) -> None:
        nonlocal progress
        progress = time.monotonic()

    while True:
        attempts += 1
        before = len(placed)
        reached = False
        try:
            async with await connect(ep, keepalive_interval=keepalive.interval, keepalive_count_max=keepalive.count,
                                     connect_timeout=10) as conn, conn.start_sftp_client() as sftp:  # fmt: skip
                reached = True
                moved()
                for path in files:
                    assert outputs is not None
                    rel = path.relative_to(outputs).as_posix()
                    if rel in placed:
                        continue
                    remote = posixpath.join(root, rel)
                    parent = posixpath.dirname(remote)
                    if parent != root:
                        await sftp.makedirs(parent, exist_ok=True)
                    fd = _open_regular(path)
                    if fd is None:  # a link, folder or FIFO put in its place since the outputs were listed
                        raise _upload_failed(root, job_id, outputs, f"the output {rel!r} is no longer a regular "
                                             "file (replaced while the outputs were being uploaded)")  # fmt: skip
                    try:
                        read = _identity_of(os.fstat(fd))
                        sha = await _send(sftp, fd, remote + PARTIAL_SUFFIX, moved)
                    finally:
                        os.close(fd)
                    await sftp.posix_rename(remote + PARTIAL_SUFFIX, remote)
                    placed[rel] = sha
                    if _identity(path) == read:  # unchanged while it was sent: only then may wipe remove it
                        sent[path] = read
                    total += read[2]
                    moved()
                latest = {rel: sha for sha, rel in written}  # a result written twice: its last version
                entries = [*placed.items(), *((rel, sha) for rel, sha in latest.items() if rel not in placed)]
                manifest = format_manifest((sha, rel) for rel, sha in entries)
                if commit:
                    staged = posixpath.join(root, RESULTS_MANIFEST + PARTIAL_SUFFIX)
                    async with sftp.open(staged, "wb") as f:
                        await f.write(manifest.encode())
                    await sftp.posix_rename(staged, posixpath.join(root, RESULTS_MANIFEST))
            return Upload(len(entries), total, manifest, committed=commit, attempts=attempts, sent=sent)
        except asyncssh.SFTPError as exc:
            if not isinstance(exc, asyncssh.SFTPConnectionLost):  # the platform refused: no retry changes that
                raise _upload_failed(root, job_id, outputs, f"the platform refused it: {exc.reason}") from exc
            error: Exception = exc
        except AccessDenied as exc:
            raise _upload_failed(root, job_id, outputs, str(exc)) from exc
        except (OSError, asyncssh.Error, PlatformUnavailable) as exc:
            gone = _local(exc, outputs, files)
            if gone is not None and isinstance(exc, OSError):  # not the link: no retry brings the file back
                why = " (removed or replaced while it was being uploaded)" if exc.errno in REPLACED else ""
                raise _upload_failed(root, job_id, outputs, f"the output {gone!r} could not be read "
                                     f"({exc.strerror}){why}") from exc  # fmt: skip
            error = exc
        fruitless = fruitless + 1 if reached and len(placed) == before else 0
        waited = time.monotonic() - progress
        if fruitless >= MAX_FRUITLESS:
            raise _upload_failed(root, job_id, outputs, f"{error} ({attempts} attempts)") from error
        if waited > tolerance:
            raise _upload_failed(
                root, job_id, outputs, f"{error}; no progress for {waited:.0f} s (outage tolerance {tolerance:.0f} s)"
            ) from error
        await asyncio.sleep(min(2.0, max(0.2, tolerance / 20)))


def _open_regular(path: Path) -> int | None:
    """``path`` opened to read, never through a link nor blocking on a FIFO; None when it is not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a link
            return None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


async def _send(sftp: asyncssh.SFTPClient, fd: int, remote: str, moved: Callable[[], None]) -> str:
    """Copy the file open at ``fd`` to a new ``remote`` file; the SHA-256 of exactly the bytes sent.

    From our own descriptor, not by name (asyncssh's ``put`` reopens its path): a name
    swapped meanwhile — for a FIFO that would block the upload for good, or a link —
    cannot make it send or hash anything else.  Large writes, which asyncssh splits into
    parallel requests.
    """
    digest = hashlib.sha256()
    offset = 0
    async with sftp.open(remote, "wb") as f:
        while chunk := os.pread(fd, SEND_CHUNK, offset):
            await f.write(chunk, offset)
            digest.update(chunk)
            offset += len(chunk)
            moved()
    return digest.hexdigest()


#: Bytes read from an output and written to the platform at a time (asyncssh sends them as parallel requests).
SEND_CHUNK = 4 * 2**20

#: Errors that mean an output was removed or replaced (by a link, a folder) while it was being uploaded.
REPLACED = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP})


def _local(exc: BaseException, outputs: Path | None, files: Sequence[Path]) -> str | None:
    """The output (relative path) an error is about, when it is about one of ours on this node, else None."""
    if outputs is None or not isinstance(exc, OSError) or exc.filename is None:
        return None
    named = os.fsdecode(exc.filename)
    return next((p.relative_to(outputs).as_posix() for p in files if str(p) == named), None)


def _upload_failed(root: str, job_id: str, outputs: Path | None, why: str) -> JobFailed:
    return JobFailed(
        f"uploading outputs to {root} failed: {why}; run the job again with --job-id {job_id} "
        f"--outputs {outputs} to finish it"
    )


def _identity(path: Path) -> tuple[int, int, int, int]:
    return _identity_of(path.lstat())


def _identity_of(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def wipe(outputs: Path, sent: Mapping[Path, tuple[int, int, int, int]]) -> list[Path]:
    """Remove the uploaded outputs from the node (they now live on the platform); return what is kept.

    Only a file that was uploaded and is unchanged since (same device, inode, size and
    mtime) is removed: one written or changed after the upload read it, a link, anything
    else, stays.  Folders are removed only when that leaves them empty.
    """
    kept: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(outputs, topdown=False):
        for name in [*filenames, *(d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))]:
            path = Path(dirpath, name)
            try:
                if sent.get(path) == _identity(path):
                    path.unlink()
                    continue
            except FileNotFoundError:
                continue
            kept.append(path)
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                with contextlib.suppress(OSError):  # not empty: it holds what is kept
                    os.rmdir(full)
    return sorted(kept)
