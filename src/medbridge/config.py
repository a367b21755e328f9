"""Settings: small frozen objects, read from a platform home's TOML and the environment."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medbridge import outage
from medbridge.errors import InvalidInput, NotInitialised
from medbridge.logs import check_format
from medbridge.net import parse_address, parse_networks

#: Ciphers offered by the data plane, fastest first (AES-GCM costs asyncssh far less
#: CPU than its default chacha20-poly1305).
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com")

#: The platform's SFTP extension for whole small files (medbridge.platform.sftp.read_file);
#: its VERSION value is the most bytes one request returns.
READ_FILE_EXTENSION = b"read-file@medbridge"


#: Where the metrics endpoint listens when its address names only a port.
METRICS_HOST = "127.0.0.1"


def metrics_address(value: object, where: str) -> tuple[str, int]:
    """The metrics endpoint's ``HOST:PORT``; a bare ``PORT`` (or ``:PORT``) is loopback, never every interface."""
    return parse_address(value, where, default_host=METRICS_HOST)


def check_keys(table: Mapping[str, Any], valid: Collection[str], where: str) -> None:
    """Settings name only keys we know: an unknown one fails and lists the valid ones."""
    unknown = sorted(set(table) - set(valid))
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        raise InvalidInput(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {names}; valid keys: {', '.join(sorted(valid))}"
        )


@dataclass(frozen=True, kw_only=True)
class PlatformSettings:
    """What an operator may tune on the platform (``platform.toml`` in the home)."""

    #: Longest lifetime of one job certificate, seconds; jobs renew within grants.
    max_certificate_lifetime: int = 24 * 3600
    #: How often live sessions are re-checked against expiry, revocation and accounts.
    enforcement_interval: float = 1.0
    #: Database URL; empty means the SQLite file in the home.
    database_url: str = ""
    #: CIDRs written into every certificate's ``source-address`` (empty: unbound).
    certificate_source_addresses: tuple[str, ...] = field(default=())
    #: Gateways whose PROXY v2 header is believed (CIDRs); a header from anyone else is refused.
    trusted_proxies: tuple[str, ...] = field(default=())
    #: Seconds a silent link may last before a session is given up (see medbridge.outage); jobs wait as long.
    outage_tolerance: float = outage.DEFAULT_TOLERANCE
    #: Seconds between signed audit checkpoints (each also written to the home's audit-anchor.json).
    audit_checkpoint_interval: float = 60.0

    # -- limits: what one user, job or connection can make the platform spend ------------
    #: File and directory handles open at once on one connection (all its SFTP sessions).
    max_open_handles: int = 256
    #: Handles one user holds at once in one worker, over all the user's connections; 0: a
    #: quarter of the worker's descriptor limit (limits.handles_per_user).
    max_open_handles_per_user: int = 0
    #: Session channels (SFTP or a command) open at once on one connection.
    max_channels_per_connection: int = 4
    #: Logged-in connections (certificate or enrolment key) one user holds at once, all workers together.
    max_sessions_per_user: int = 64
    #: Certificates issued to one user within ``certificate_rate_window`` seconds.
    certificate_rate_limit: int = 120
    certificate_rate_window: int = 60
    #: Certificates of one job that are neither revoked nor expired, at once (renewals overlap).
    max_live_certificates_per_job: int = 32
    #: Where job results are kept; empty: ``storage/results`` in the home.  Give it a file
    #: system of its own, so full results can never stop the control database (and revocation).
    results_dir: str = ""
    #: Bytes of results (apparent sizes: sparse files count whole) per user and per job.
    results_quota_per_user: int = 1 << 40
    results_quota_per_job: int = 256 << 30
    #: The largest result file (every write's offset plus length, every truncate).
    results_max_file_size: int = 32 << 30
    #: Files and folders in one user's results, and in one job's.
    results_max_entries_per_user: int = 1_000_000
    results_max_entries_per_job: int = 100_000

    # -- operations ---------------------------------------------------------------------
    #: HOST:PORT of the Prometheus endpoint (``/metrics``), or PORT alone for loopback; empty: none.
    #: A management address only: never one that jobs or the gateway's routes reach
    #: (docs/platform-operator-guide.md).
    metrics: str = ""
    #: Log lines on stderr: ``text``, or ``json`` (one object per line, medbridge.logs).
    log_format: str = "text"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, origin: str = "settings") -> PlatformSettings:
        """Build from parsed TOML; unknown keys fail and name the valid ones."""
        check_keys(data, {f.name for f in dataclasses.fields(cls)}, origin)
        values: dict[str, Any] = {}
        for key, raw in data.items():
            default = getattr(cls(), key)
            if isinstance(default, tuple):
                if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
                    raise InvalidInput(f"{origin}: {key} must be a list of strings")
                values[key] = tuple(raw)
            elif key in _SIZES and isinstance(raw, str):
                values[key] = parse_size(raw, f"{origin}: {key}")
            elif isinstance(default, bool) or (
                not isinstance(raw, type(default)) and not (isinstance(default, float) and isinstance(raw, int))
            ):
                raise InvalidInput(f"{origin}: {key} must be a {type(default).__name__}")
            else:
                values[key] = type(default)(raw)
        settings = cls(**values)
        for key in ("certificate_source_addresses", "trusted_proxies"):
            parse_networks(getattr(settings, key), f"{origin}: {key}")
        if (
            min(settings.max_certificate_lifetime, settings.enforcement_interval, settings.audit_checkpoint_interval)
            <= 0
        ):
            raise InvalidInput(f"{origin}: lifetimes and intervals must be positive")
        for key in _LIMITS:
            if getattr(settings, key) <= 0:
                raise InvalidInput(f"{origin}: {key} must be positive")
        if settings.max_open_handles_per_user < 0:
            raise InvalidInput(f"{origin}: max_open_handles_per_user must be positive (or 0: derived)")
        try:
            outage.check(settings.outage_tolerance, f"{origin}: outage_tolerance")
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc
        if settings.metrics:
            metrics_address(settings.metrics, f"{origin}: metrics")
        check_format(settings.log_format, f"{origin}: log_format")
        return settings


#: Limits that must be positive; the sizes among them also take "256GiB"-style strings.
_SIZES = ("results_quota_per_user", "results_quota_per_job", "results_max_file_size")
_LIMITS = ("max_open_handles", "max_channels_per_connection", "max_sessions_per_user", "certificate_rate_limit",
           "certificate_rate_window", "max_live_certificates_per_job", "results_max_entries_per_user",
           "results_max_entries_per_job", *_SIZES)  # fmt: skip
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}  # fmt: skip


def parse_size(text: str, where: str) -> int:
    """``"256GiB"``, ``"500 MB"`` or ``"1024"`` in bytes; anything else is a clear error."""
    number = text.strip().rstrip("BbIiKkMmGgTt ")
    unit = text.strip()[len(number) :].strip().upper()
    if not number.isdigit() or unit not in _UNITS:
        raise InvalidInput(
            f"{where}: {text!r} is not a size (bytes, or a number with KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
        )
    return int(number) * _UNITS[unit]


class Home:
    """The platform's folder: keys, control database, settings and storage."""

    SETTINGS = "platform.toml"

    def __init__(self, root: Path):
        self.root = root

    @classmethod
    def resolve(cls, home: str | os.PathLike[str] | None, environ: Mapping[str, str] = os.environ) -> Home:
        """``--home``, else ``$MEDBRIDGE_HOME``, else the per-user default."""
        if home is not None:
            return cls(Path(home).expanduser().absolute())
        if environ.get("MEDBRIDGE_HOME"):
            return cls(Path(environ["MEDBRIDGE_HOME"]).expanduser().absolute())
        base = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        return cls(Path(base) / "medbridge")

    @property
    def settings_file(self) -> Path:
        return self.root / self.SETTINGS

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def host_key(self) -> Path:
        return self.keys / "host_ed25519"

    @property
    def ca_key(self) -> Path:
        return self.keys / "user_ca_ed25519"

    @property
    def audit_key(self) -> Path:
        """Signs the audit's checkpoints (medbridge.platform.anchor)."""
        return self.keys / "audit_ed25519"

    @property
    def audit_anchor(self) -> Path:
        """The latest signed checkpoint, for an operator to ship off the platform."""
        return self.root / "audit-anchor.json"

    @property
    def datasets(self) -> Path:
        return self.root / "storage" / "datasets"

    @property
    def manifests(self) -> Path:
        """Each dataset version's manifest files (medbridge.platform.catalogue), on the same storage."""
        return self.root / "storage" / "manifests"

    @property
    def results(self) -> Path:
        return self.root / "storage" / "results"

    def results_root(self, settings: PlatformSettings) -> Path:
        """Where job results are kept: ``results_dir`` if set (best a file system of its own), else :attr:`results`."""
        return Path(settings.results_dir).expanduser().absolute() if settings.results_dir else self.results

    @property
    def database(self) -> Path:
        return self.root / "control.db"

    def require(self) -> None:
        """Fail with a clear message unless ``platform init`` has run here (the SQLite file only if it is used)."""
        needed = (self.settings_file, self.host_key, self.ca_key)
        if not all(p.exists() for p in needed) or not (self.database.exists() or self.settings().database_url):
            raise NotInitialised(
                f"platform home {self.root} is not initialised; run 'medbridge platform init --home {self.root}'"
            )

    def settings(self) -> PlatformSettings:
        if not self.settings_file.exists():
            self.require()
        try:
            data = tomllib.loads(self.settings_file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidInput(f"{self.settings_file}: {exc}") from exc
        return PlatformSettings.from_mapping(data, origin=str(self.settings_file))

    def database_url(self, settings: PlatformSettings) -> str:
        return settings.database_url or f"sqlite:///{self.database}"
