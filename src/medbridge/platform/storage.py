"""Platform storage: initialising a home and bringing datasets in whole or not at all."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medbridge.config import Home
from medbridge.control.audit import AuditEvent
from medbridge.control.store import BATCH, DatasetInfo, ManifestEntry, Store
from medbridge.errors import AlreadyExists, InvalidInput, NotAnonymised
from medbridge.ingest.gate import GateTally, check_file
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
# Database URL; empty means control.db in this folder (SQLite); postgresql+psycopg://… for PostgreSQL.
database_url = ""
# CIDRs written into every certificate's source-address option; empty leaves it unbound.
certificate_source_addresses = []
# Gateways (CIDRs) whose PROXY v2 header carrying the client's address is believed.
trusted_proxies = []

# Limits: what one user, job or connection may make the platform spend (defaults shown).
# Handles (files and folders) open at once on one connection; session channels per connection.
# max_open_handles = 256
# Handles one user holds in one worker over all their connections (0: a quarter of its descriptor limit).
# max_open_handles_per_user = 0
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
# Seconds between signed audit checkpoints; each is also written to audit-anchor.json here, to ship elsewhere.
audit_checkpoint_interval = 60.0
"""

CHUNK = 1 << 20


def init_home(home: Home, actor: str, database_url: str = "") -> str:
    """Create keys, database, settings and storage; return the host-key fingerprint.

    ``database_url`` names a server database (PostgreSQL) for the control plane instead
    of the SQLite file in the home; it is created at the newest schema revision.
    """
    if home.settings_file.exists() or home.database.exists():
        raise AlreadyExists(f"{home.root} is already a platform home")
    home.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(home.root, 0o700)
    for folder in (home.datasets, home.results, home.manifests):
        folder.mkdir(parents=True, exist_ok=True, mode=0o750)
    host = create_private_key(home.host_key)
    create_private_key(home.ca_key)
    create_private_key(home.audit_key)
    home.settings_file.write_text(
        DEFAULT_SETTINGS.replace('database_url = ""', f"database_url = {json.dumps(database_url)}")
    )
    store = Store(home.database_url(home.settings()))
    try:
        store.create()
        event = AuditEvent(actor=actor, action="platform.init", outcome="ok", detail={"host_key": fingerprint(host)})
        store.audit([event], datetime.now(UTC))
    finally:
        store.close()
    return fingerprint(host)


def walk_source(src: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every regular file under ``src`` as (relative path, stat), in code-point order of the path.

    The order is the manifest's, so a walk merges with the catalogue row by row.  One
    directory's listing is held at a time per level, never the whole tree.  Links,
    special files, names that are not UTF-8 or hold a line break, and the names the
    catalogue reserves are refused rather than guessed at.
    """
    if not src.is_dir():
        raise InvalidInput(f"--from {src}: not a directory")
    stack = [("", iter(_listing(src, "")))]
    while stack:
        rel, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        name, st = entry
        if stat.S_ISDIR(st.st_mode):
            stack.append((f"{rel}{name}/", iter(_listing(src, f"{rel}{name}/"))))
        else:
            yield f"{rel}{name}", st


def _listing(src: Path, rel: str) -> list[tuple[str, os.stat_result]]:
    """One folder's entries, checked, sorted so that the walk yields paths in code-point order."""
    folder = src / rel if rel else src
    keyed = []
    try:
        with os.scandir(folder) as it:
            for e in it:
                shown = folder / e.name
                try:
                    e.name.encode("utf-8")
                except UnicodeEncodeError:
                    raise InvalidInput(f"{shown}: the name is not UTF-8") from None
                if "\n" in e.name or "\r" in e.name:
                    raise InvalidInput(f"{shown!r}: names with line breaks cannot be listed in a manifest")
                st = e.stat(follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise InvalidInput(f"{shown}: symbolic links are not accepted in a dataset")
                if not rel and e.name in (DATASET_MANIFEST, MANIFEST_INDEX, SHARDS_DIR):
                    raise InvalidInput(f"{shown}: the name {e.name} is reserved for the dataset's catalogue")
                if stat.S_ISDIR(st.st_mode):
                    keyed.append((e.name + "/", e.name, st))  # a folder's paths continue with '/'
                elif stat.S_ISREG(st.st_mode):
                    keyed.append((e.name, e.name, st))
                else:
                    raise InvalidInput(f"{shown}: not a regular file")
    except OSError as exc:
        raise InvalidInput(f"cannot read {exc.filename or folder}: {exc.strerror}") from exc
    keyed.sort(key=lambda k: k[0])
    return [(name, st) for _, name, st in keyed]


def count_source(src: Path) -> tuple[int, int]:
    """Files and bytes under ``src`` (a walk, nothing read or kept): the progress bar's total."""
    files = size = 0
    for _, st in walk_source(src):
        files += 1
        size += st.st_size
    return files, size


#: ``progress(files, bytes)`` after each file copied.
Progress = Callable[[int, int], None]


def add_dataset(
    home: Home,
    store: Store,
    name: str,
    src: Path,
    provider: str,
    actor: str,
    progress: Progress | None = None,
    profile: Profile | None = None,
    allow_report: bool = False,
    tally: GateTally | None = None,
) -> tuple[DatasetInfo, GateTally]:
    """Copy ``src`` into storage, fingerprint and type every file, judge the copy with the anonymisation gate.

    Streams: each file is copied, hashed, gated and recorded in batches as it comes,
    so memory stays flat whatever the file count.  The gate reads the staged copy,
    never the source, so what is judged is what is stored.  A failing dataset is
    refused (and the refusal audited) unless an administrator accepts the report;
    either way it appears whole or not at all (nobody sees it before its last file is
    recorded).  ``tally`` collects the gate's verdict (the caller's, to print failures).
    """
    check_name("dataset", name)
    if store.dataset_exists(name):
        raise AlreadyExists(f"dataset {name!r} already exists")
    final = home.datasets / name
    if final.exists():
        raise AlreadyExists(f"storage for dataset {name!r} already exists at {final}")
    rules = profile or load_profile()
    tally = tally if tally is not None else GateTally(rules.name)
    staging = home.datasets / f".incoming-{name}-{os.getpid()}"
    _remove_tree(staging)
    ds_id = store.begin_dataset(name, provider, str(final), datetime.now(UTC))
    try:
        batch: list[ManifestEntry] = []
        for rel, _ in walk_source(src):
            entry = _copy(src, rel, staging)
            tally.add(check_file(staging / rel, rules, shown=rel))
            batch.append(entry)
            if len(batch) >= BATCH:
                store.record_files(ds_id, batch)
                batch.clear()
            if progress:
                progress(1, entry.size)
        store.record_files(ds_id, batch)
        if not tally.passed and not allow_report:
            _refuse(store, name, tally, actor)
        for dirpath, _, _ in os.walk(staging):
            os.chmod(dirpath, 0o550)
        staging.mkdir(exist_ok=True, mode=0o550)  # an empty source is an empty dataset
        os.rename(staging, final)
    except BaseException as exc:
        _remove_tree(staging)
        store.abandon_dataset(ds_id)
        if isinstance(exc, OSError):
            raise InvalidInput(f"cannot copy dataset {name!r}: {exc}") from exc
        raise
    try:
        info = store.finish_dataset(ds_id, datetime.now(UTC), actor, gate=_gate_detail(tally, rules, allow_report))
    except BaseException:
        _remove_tree(final)
        store.abandon_dataset(ds_id)
        raise
    Catalogue(store, home.manifests).build(name)
    return info, tally


@dataclass
class Update:
    """What ``dataset add --update`` did: files new, changed (rehashed, different), unchanged, and missing."""

    info: DatasetInfo
    tally: GateTally
    added: int = 0
    changed: int = 0
    unchanged: int = 0
    #: Recorded files the source no longer has: kept (an update never removes archived data).
    missing: int = 0
    missing_examples: list[str] = field(default_factory=list)


def update_dataset(
    home: Home,
    store: Store,
    name: str,
    src: Path,
    actor: str,
    progress: Progress | None = None,
    profile: Profile | None = None,
    allow_report: bool = False,
    tally: GateTally | None = None,
) -> Update:
    """Bring a dataset up to date with ``src``: only new files, and files whose size or time moved, are hashed.

    The source walk merges with the recorded catalogue row by row (both in path order).
    New and changed files are staged and gated; if the gate passes they are moved into
    storage and recorded as the dataset's next version in one transaction.  Files the
    source lacks are kept and reported: an archive loses nothing because a delivery
    folder was partial.
    """
    rules = profile or load_profile()
    info = store.claim(name)
    result = Update(info, tally if tally is not None else GateTally(rules.name))
    root = Path(info.storage_path)
    staging = home.datasets / f".updating-{name}-{os.getpid()}"
    _remove_tree(staging)
    staged: list[str] = []
    try:
        with store.manifest_rows(name) as (_, rows):
            recorded = _merge(walk_source(src), rows, result)
            batch: list[ManifestEntry] = []
            for rel, st, known in recorded:
                if known is not None and known.size == st.st_size and known.mtime_ns == st.st_mtime_ns:
                    result.unchanged += 1
                    continue
                entry = _copy(src, rel, staging)
                if known is not None and (known.sha256, known.size) == (entry.sha256, entry.size):
                    result.unchanged += 1  # touched, not changed: recorded with its new time, not moved
                else:
                    result.tally.add(check_file(staging / rel, rules, shown=rel))
                    staged.append(rel)
                    if known is None:
                        result.added += 1
                    else:
                        result.changed += 1
                batch.append(entry)
                if len(batch) >= BATCH:
                    store.stage_changes(info.id, batch)
                    batch.clear()
                if progress:
                    progress(1, entry.size)
            store.stage_changes(info.id, batch)
        if not result.tally.passed and not allow_report:
            _refuse(store, name, result.tally, actor)
        _place(staging, root, staged)
        detail = {"added": result.added, "changed": result.changed, "unchanged": result.unchanged,
                  "missing_from_source": result.missing, "missing_examples": result.missing_examples,
                  **_gate_detail(result.tally, rules, allow_report)}  # fmt: skip
        result.info = store.apply_changes(info.id, datetime.now(UTC), actor, "dataset.update", detail)
    except BaseException as exc:
        store.release(info.id)
        if isinstance(exc, OSError):
            raise InvalidInput(f"cannot update dataset {name!r}: {exc}") from exc
        raise
    finally:
        _remove_tree(staging)
    Catalogue(store, home.manifests).build(name)
    return result


def _merge(
    source: Iterator[tuple[str, os.stat_result]], rows: Iterator[ManifestEntry], result: Update
) -> Iterator[tuple[str, os.stat_result, ManifestEntry | None]]:
    """Each source file with its recorded entry (None if new); recorded files the source lacks are counted."""
    row = next(rows, None)
    for rel, st in source:
        while row is not None and row.path < rel:
            if not row.path.startswith(SHARDS_DIR + "/"):
                result.missing += 1
                if len(result.missing_examples) < 20:
                    result.missing_examples.append(row.path)
            row = next(rows, None)
        if row is not None and row.path == rel:
            yield rel, st, row
            row = next(rows, None)
        else:
            yield rel, st, None
    while row is not None:
        if not row.path.startswith(SHARDS_DIR + "/"):
            result.missing += 1
            if len(result.missing_examples) < 20:
                result.missing_examples.append(row.path)
        row = next(rows, None)


def _place(staging: Path, root: Path, staged: Iterable[str]) -> None:
    """Move staged files into the read-only dataset folder (a replaced file's readers keep its old bytes)."""
    for rel in staged:
        target = root / rel
        opened: list[Path] = []
        parent = target.parent
        missing = []
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        os.chmod(parent, 0o750)
        opened.append(parent)
        try:
            for folder in reversed(missing):
                folder.mkdir(mode=0o750)
                opened.append(folder)
            os.replace(staging / rel, target)
        finally:
            for folder in opened:
                os.chmod(folder, 0o550)


def _gate_detail(tally: GateTally, rules: Profile, allow_report: bool) -> dict[str, Any]:
    gate: dict[str, Any] = {"profile": tally.profile, "gate_passed": tally.passed,
                            "accepted_with_report": allow_report and not tally.passed,
                            "failed_files": [f.path for f in tally.failed]}  # fmt: skip
    if rules.declared:
        gate["pseudonyms"] = dict(rules.declared)
    return gate


def _refuse(store: Store, name: str, report: GateTally, actor: str) -> None:
    failed = report.failed
    issues = [{"path": f.path, "issues": [i.as_dict() for i in f.issues][:20]} for f in failed[:200]]
    store.audit([AuditEvent(actor=actor, action="dataset.refused", outcome="refused", subject=name,
                            detail={"profile": report.profile, "failed": report.failed_count, "files": issues})],
                datetime.now(UTC))  # fmt: skip
    first = failed[0]
    why = first.issues[0]
    raise NotAnonymised(
        f"dataset {name!r} refused: {report.failed_count} file(s) fail the anonymisation profile {report.profile} "
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


def _copy(src: Path, rel: str, staging: Path) -> ManifestEntry:
    """Copy one file into staging, hashing and typing it on the way; the source's time goes with the record."""
    f = src / rel
    dest = staging / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    head = b""
    fd = os.open(f, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InvalidInput(f"{f}: changed into something other than a regular file while being copied")
    with os.fdopen(fd, "rb") as fin, open(dest, "xb") as fout:
        while chunk := fin.read(CHUNK):
            if len(head) < HEAD:
                head += chunk[: HEAD - len(head)]
            digest.update(chunk)
            fout.write(chunk)
            size += len(chunk)
    os.chmod(dest, 0o440)
    return ManifestEntry(rel, size, digest.hexdigest(), media_type(head, f.name), st.st_mtime_ns)


def _remove_tree(path: Path) -> None:
    for dirpath, _, _ in os.walk(path):
        os.chmod(dirpath, 0o750)
    shutil.rmtree(path, ignore_errors=True)


SHARDS_DIR = ".shards"
