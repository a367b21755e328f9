"""Platform storage: initialising a home and bringing datasets in whole or not at all."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from medbridge.config import Home
from medbridge.control.audit import AuditEvent
from medbridge.control.store import ManifestEntry, Store
from medbridge.errors import AlreadyExists, InvalidInput, NotAnonymised
from medbridge.ingest.gate import GateReport, check_tree
from medbridge.ingest.media import HEAD, media_type
from medbridge.ingest.profile import Profile, load_profile
from medbridge.ingest.shards import ShardInfo, pack
from medbridge.platform.catalogue import Catalogue
from medbridge.platform.keys import create_private_key, fingerprint
from medbridge.policy.manifest import DATASET_MANIFEST, MANIFEST_INDEX
from medbridge.policy.names import check_name
from medbridge.processes import sha256_file

DEFAULT_SETTINGS = """\
# medbridge platform settings; every key is optional.
# Longest lifetime of one job certificate, in seconds (jobs renew within their grants).
max_certificate_lifetime = 86400
# Seconds between re-checks of live sessions (expiry, revocation, disabled accounts).
enforcement_interval = 1.0
# Database URL; empty means control.db in this folder (SQLite).
database_url = ""
# CIDRs written into every certificate's source-address option; empty leaves it unbound.
certificate_source_addresses = []
# Gateways (CIDRs) whose PROXY v2 header carrying the client's address is believed.
trusted_proxies = []

# Limits: what one user, job or connection may make the platform spend (defaults shown).
# Handles (files and folders) open at once on one connection; session channels per connection.
# max_open_handles = 256
# max_channels_per_connection = 4
# Logged-in connections one user holds at once, over all worker processes.
# max_sessions_per_user = 64
# Certificates one user is issued per window (seconds); live certificates of one job.
# certificate_rate_limit = 120
# certificate_rate_window = 60
# max_live_certificates_per_job = 32
# Job results: put them on a file system of their own (full results then stop nothing else).
# results_dir = "/srv/medbridge-results"      # empty: storage/results in this folder
# Quotas on results (sizes as bytes or "256GiB"; sparse files count whole) and entries.
# results_quota_per_user = "1TiB"
# results_quota_per_job = "256GiB"
# results_max_file_size = "32GiB"
# results_max_entries_per_user = 1000000
# results_max_entries_per_job = 100000
"""

CHUNK = 1 << 20


def init_home(home: Home, actor: str) -> str:
    """Create keys, database, settings and storage; return the host-key fingerprint."""
    if home.settings_file.exists() or home.database.exists():
        raise AlreadyExists(f"{home.root} is already a platform home")
    home.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(home.root, 0o700)
    for folder in (home.datasets, home.results, home.manifests):
        folder.mkdir(parents=True, exist_ok=True, mode=0o750)
    host = create_private_key(home.host_key)
    create_private_key(home.ca_key)
    home.settings_file.write_text(DEFAULT_SETTINGS)
    store = Store(home.database_url(home.settings()))
    try:
        store.create()
        event = AuditEvent(actor=actor, action="platform.init", outcome="ok", detail={"host_key": fingerprint(host)})
        store.audit([event], datetime.now(UTC))
    finally:
        store.close()
    return fingerprint(host)


def scan_source(src: Path) -> list[Path]:
    """Every regular file under ``src``; refuse links and special files rather than guess."""
    if not src.is_dir():
        raise InvalidInput(f"--from {src}: not a directory")
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(src, onerror=_raise):
        base = Path(dirpath)
        for name in sorted(dirnames):
            if (base / name).is_symlink():
                raise InvalidInput(f"{base / name}: symbolic links are not accepted in a dataset")
        for name in sorted(filenames):
            p = base / name
            mode = p.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise InvalidInput(f"{p}: symbolic links are not accepted in a dataset")
            if not stat.S_ISREG(mode):
                raise InvalidInput(f"{p}: not a regular file")
            if p.parent == src and name in (DATASET_MANIFEST, MANIFEST_INDEX):
                raise InvalidInput(f"{p}: the name {name} is reserved for the dataset's manifest")
            if p.relative_to(src).parts[0] == SHARDS_DIR:
                raise InvalidInput(f"{p}: the folder {SHARDS_DIR} is reserved for the dataset's shards")
            files.append(p)
    return sorted(files)


def _raise(exc: OSError) -> None:
    raise InvalidInput(f"cannot read {exc.filename}: {exc.strerror}") from exc


def add_dataset(
    home: Home,
    store: Store,
    name: str,
    src: Path,
    provider: str,
    actor: str,
    progress: Callable[[int], None] | None = None,
    profile: Profile | None = None,
    allow_report: bool = False,
) -> tuple[list[ManifestEntry], GateReport]:
    """Copy ``src`` into storage, fingerprint and type every file, judge the copy with the anonymisation gate.

    The gate reads the staged copy, never the source, so what is judged is what is
    stored.  A failing dataset is refused (and the refusal audited) unless an
    administrator accepts the report; either way it appears whole or not at all.
    """
    check_name("dataset", name)
    if store.dataset_exists(name):
        raise AlreadyExists(f"dataset {name!r} already exists")
    files = scan_source(src)
    final = home.datasets / name
    if final.exists():
        raise AlreadyExists(f"storage for dataset {name!r} already exists at {final}")
    staging = home.datasets / f".incoming-{name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        manifest = [_copy(src, f, staging, progress) for f in files]
        report = check_tree(staging, profile or load_profile())
        if not report.passed and not allow_report:
            _refuse(store, name, report, actor)
        for dirpath, _, _ in os.walk(staging):
            os.chmod(dirpath, 0o550)
        os.rename(staging, final)
    except OSError as exc:
        _remove_tree(staging)
        raise InvalidInput(f"cannot copy dataset {name!r}: {exc}") from exc
    except BaseException:
        _remove_tree(staging)
        raise
    gate = {"profile": report.profile, "gate_passed": report.passed,
            "accepted_with_report": allow_report and not report.passed,
            "failed_files": [f.path for f in report.failed][:200]}  # fmt: skip
    if profile is not None and profile.declared:
        gate["pseudonyms"] = dict(profile.declared)
    try:
        store.add_dataset(name, provider, str(final), manifest, datetime.now(UTC), actor, gate=gate)
    except BaseException:
        _remove_tree(final)
        raise
    Catalogue(store, home.manifests).build(name)
    return manifest, report


def _refuse(store: Store, name: str, report: GateReport, actor: str) -> None:
    failed = report.failed
    issues = [{"path": f.path, "issues": [i.as_dict() for i in f.issues][:20]} for f in failed[:200]]
    store.audit([AuditEvent(actor=actor, action="dataset.refused", outcome="refused", subject=name,
                            detail={"profile": report.profile, "failed": len(failed), "files": issues})],
                datetime.now(UTC))  # fmt: skip
    first = failed[0]
    why = first.issues[0]
    raise NotAnonymised(
        f"dataset {name!r} refused: {len(failed)} file(s) fail the anonymisation profile {report.profile} "
        f"(first: {first.path}: {why.tag} {why.keyword}: {why.reason}); an administrator may accept the report "
        "with --allow-report"
    )


def pack_dataset(home: Home, store: Store, name: str, shard_size: int, actor: str) -> list[ShardInfo]:
    """Pack a dataset's files into shards beside them (``.shards/``), listed in its manifest."""
    manifest = store.manifest(name)
    root = Path(store.dataset_roots([name])[name])
    out = root / SHARDS_DIR
    if out.exists():
        raise AlreadyExists(f"dataset {name!r} is already packed ({out})")
    # in path order: a case's files (case-001.image.nii, case-001.label.nii.gz) stay next to each other,
    # which is how WebDataset groups a sample's fields
    originals = sorted((m.path, root / m.path) for m in manifest if not m.path.startswith(SHARDS_DIR + "/"))
    staging = root.parent / f".packing-{name}-{os.getpid()}"
    _remove_tree(staging)
    try:
        shards = pack(originals, staging, shard_size)
        for dirpath, _, filenames in os.walk(staging):
            for f in filenames:
                os.chmod(os.path.join(dirpath, f), 0o440)
        os.chmod(root, 0o750)
        os.rename(staging, out)
        os.chmod(out, 0o550)
        os.chmod(root, 0o550)
    except BaseException:
        _remove_tree(staging)
        raise
    entries = []
    for shard in shards:
        for path, media in ((shard.path, "application/x-tar"), (shard.index_path, "application/json")):
            final = out / path.name
            entries.append(ManifestEntry(f"{SHARDS_DIR}/{path.name}", final.stat().st_size, sha256_file(final), media))
    try:
        store.add_files(name, entries, datetime.now(UTC), actor, "dataset.pack")
    except BaseException:
        _remove_tree(out)
        raise
    Catalogue(store, home.manifests).build(name)
    return shards


def _copy(src: Path, f: Path, staging: Path, progress: Callable[[int], None] | None) -> ManifestEntry:
    rel = f.relative_to(src)
    dest = staging / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    head = b""
    fd = os.open(f, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidInput(f"{f}: changed into something other than a regular file while being copied")
    with os.fdopen(fd, "rb") as fin, open(dest, "xb") as fout:
        while chunk := fin.read(CHUNK):
            if len(head) < HEAD:
                head += chunk[: HEAD - len(head)]
            digest.update(chunk)
            fout.write(chunk)
            size += len(chunk)
            if progress:
                progress(len(chunk))
    os.chmod(dest, 0o440)
    return ManifestEntry(rel.as_posix(), size, digest.hexdigest(), media_type(head, rel.name))


def _remove_tree(path: Path) -> None:
    for dirpath, _, _ in os.walk(path):
        os.chmod(dirpath, 0o750)
    shutil.rmtree(path, ignore_errors=True)


SHARDS_DIR = ".shards"
