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
from medbridge.errors import AlreadyExists, InvalidInput
from medbridge.platform.keys import create_private_key, fingerprint
from medbridge.policy.manifest import DATASET_MANIFEST
from medbridge.policy.names import check_name

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
"""

CHUNK = 1 << 20


def init_home(home: Home, actor: str) -> str:
    """Create keys, database, settings and storage; return the host-key fingerprint."""
    if home.settings_file.exists() or home.database.exists():
        raise AlreadyExists(f"{home.root} is already a platform home")
    home.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(home.root, 0o700)
    for folder in (home.datasets, home.results):
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
            if p.parent == src and name == DATASET_MANIFEST:
                raise InvalidInput(f"{p}: the name {DATASET_MANIFEST} is reserved for the dataset's manifest")
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
) -> list[ManifestEntry]:
    """Copy ``src`` into storage, fingerprinting every file; the dataset appears whole or not at all."""
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
        for dirpath, _, _ in os.walk(staging):
            os.chmod(dirpath, 0o550)
        os.rename(staging, final)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise InvalidInput(f"cannot copy dataset {name!r}: {exc}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        store.add_dataset(name, provider, str(final), manifest, datetime.now(UTC), actor)
    except BaseException:
        _remove_tree(final)
        raise
    return manifest


def _copy(src: Path, f: Path, staging: Path, progress: Callable[[int], None] | None) -> ManifestEntry:
    rel = f.relative_to(src)
    dest = staging / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    fd = os.open(f, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidInput(f"{f}: changed into something other than a regular file while being copied")
    with os.fdopen(fd, "rb") as fin, open(dest, "xb") as fout:
        while chunk := fin.read(CHUNK):
            digest.update(chunk)
            fout.write(chunk)
            size += len(chunk)
            if progress:
                progress(len(chunk))
    os.chmod(dest, 0o440)
    return ManifestEntry(rel.as_posix(), size, digest.hexdigest())


def _remove_tree(path: Path) -> None:
    for dirpath, _, _ in os.walk(path):
        os.chmod(dirpath, 0o750)
    shutil.rmtree(path, ignore_errors=True)
