"""The platform's Prometheus metrics: counted in every server process, served only where the operator says.

Every label takes its values from a fixed set or from names the operator made
(datasets), never from what a client sends: SFTP operations map to a fixed list,
and refusals to a fixed set of reason codes (the audit keeps the words).

With ``platform serve --workers N`` each worker counts into files of its own in a
folder the parent made (prometheus_client's multiprocess mode), and the parent
alone serves their sum: one endpoint however many workers, counters that survive a
worker's restart, and no scrape waits on a busy worker's event loop.
``PROMETHEUS_MULTIPROC_DIR`` must name that folder before prometheus_client is
first imported (:func:`medbridge.platform.workers.metrics_folder` does it), so this
module imports it only when metrics are first made or served: importing this module
(the issuer does, and the compute side imports the issuer) must not.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Mapping
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, TypeVar

from asyncssh import constants as c

from medbridge.control.audit import AuditEvent
from medbridge.errors import AccountDisabled, AuditUnavailable, GrantMissing, InvalidInput, LimitReached
from medbridge.net import bind, format_address

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("medbridge.platform")

#: SFTP request types by name; anything else is ``other``.
OPS = {
    c.FXP_OPEN: "open", c.FXP_CLOSE: "close", c.FXP_READ: "read", c.FXP_WRITE: "write", c.FXP_LSTAT: "lstat",
    c.FXP_FSTAT: "fstat", c.FXP_SETSTAT: "setstat", c.FXP_FSETSTAT: "fsetstat", c.FXP_OPENDIR: "opendir",
    c.FXP_READDIR: "readdir", c.FXP_REMOVE: "remove", c.FXP_MKDIR: "mkdir", c.FXP_RMDIR: "rmdir",
    c.FXP_REALPATH: "realpath", c.FXP_STAT: "stat", c.FXP_RENAME: "rename", c.FXP_READLINK: "readlink",
    c.FXP_SYMLINK: "symlink", c.FXP_LINK: "link", c.FXP_BLOCK: "block", c.FXP_UNBLOCK: "unblock",
}  # fmt: skip
#: Extended requests by name (the platform's read-file and OpenSSH's); any other is ``extended``.
EXTENSIONS = {
    b"read-file@medbridge": "read-file", b"posix-rename@openssh.com": "posix-rename",
    b"statvfs@openssh.com": "statvfs", b"fstatvfs@openssh.com": "fstatvfs", b"hardlink@openssh.com": "hardlink",
    b"fsync@openssh.com": "fsync", b"lsetstat@openssh.com": "lsetstat", b"limits@openssh.com": "limits",
    b"expand-path@openssh.com": "expand-path", b"copy-data": "copy-data", b"ranges@asyncssh.com": "ranges",
}  # fmt: skip

#: Where a refusal was recorded: the first word of its audit action (``sftp.refused`` is ``sftp``).
ACTIONS = ("login", "sftp", "certificate", "command", "channel", "session", "feature", "proxy", "connection",
           "results", "other")  # fmt: skip

#: Why, as a code: the first rule whose pattern the audit's reason matches (case-insensitive), else ``other``.
RULES: tuple[tuple[str, str], ...] = (
    ("audit_unavailable", r"\baudit\b|written late"),
    ("descriptors", r"descriptor|cannot be counted"),
    ("proxy", r"proxy"),
    ("revoked", r"revoked|job .* has ended"),
    ("account_disabled", r"disabled"),
    ("unsupported", r"grants no|not served|not supported|cannot be created|no commands|subsystem|shell|"
                    r"without a command"),
    ("expired", r"expired|not yet valid|\bend before\b|\bends? within\b"),
    ("no_grant", r"grant"),
    ("bad_request", r"not json|must be|needs? an?\b|unknown field|at least one"),
    ("limit", r"max_|limit|quota|too many|may not grow|already holds?|already has"),
    ("identity", r"not enrolled|unknown ca|not issued by|serial|principal|issued to|enrolled for|signature|"
                 r"certificate|enrolment key|source-address"),
    ("read_only", r"read-only|committed|only the job's own|belong to another|written only by"),
    ("path", r"outside|climbs above|too long|symlink|malformed|not utf|escape|no such|storage missing|namespace|path"),
)  # fmt: skip
REASONS = (*(code for code, _ in RULES), "other")
_RULES = tuple((code, re.compile(pattern, re.IGNORECASE)) for code, pattern in RULES)
#: Errors whose class already says why (the issuer's refusals).
_ERRORS: tuple[tuple[type[BaseException], str], ...] = (
    (AuditUnavailable, "audit_unavailable"), (AccountDisabled, "account_disabled"), (GrantMissing, "no_grant"),
    (LimitReached, "limit"), (InvalidInput, "bad_request"),
)  # fmt: skip

#: Seconds from an audit event's record to its commit.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def reason_code(reason: object) -> str:
    """One of :data:`REASONS` for a refusal's free-text reason (anything that is not a string is ``other``)."""
    if isinstance(reason, str):
        for code, pattern in _RULES:
            if pattern.search(reason):
                return code
    return "other"


def error_code(exc: BaseException) -> str:
    """One of :data:`REASONS` for a refusal raised as an error: by its class, else by its words."""
    return next((code for cls, code in _ERRORS if isinstance(exc, cls)), None) or reason_code(str(exc))


def action_label(action: str) -> str:
    """One of :data:`ACTIONS` for an audit action."""
    first = action.split(".", 1)[0]
    return first if first in ACTIONS else "other"


def event_reason(detail: Mapping[str, Any]) -> object:
    """A refusal's reason from its audit detail: ``reason``, else the last login attempt's, else the audit's note.

    (The sink notes ``audit`` on a decision it refused because the audit could not record it.)
    """
    if "reason" in detail:
        return detail["reason"]
    attempts = detail.get("attempts")
    if isinstance(attempts, list) and attempts and isinstance(attempts[-1], Mapping):
        return attempts[-1].get("reason")
    return detail.get("audit")


def op_name(pkttype: int, name: bytes = b"") -> str:
    """The operation of an SFTP request: its type, or an extended request's ``name``, from a fixed list."""
    if pkttype != c.FXP_EXTENDED:
        return OPS.get(pkttype, "other")
    return EXTENSIONS.get(name, "extended")


class PlatformMetrics:
    """One server process's counters, in a registry of their own (see the module's docstring for workers)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.sessions_open = Gauge("medbridge_platform_sessions_open", "Job-certificate sessions open",
                                   multiprocess_mode="livesum", registry=r)  # fmt: skip
        self.sessions = Counter("medbridge_platform_sessions", "Job-certificate sessions opened", registry=r)
        self.served = Counter("medbridge_platform_served_bytes", "Dataset bytes sent to jobs, by dataset",
                              ["dataset"], registry=r)  # fmt: skip
        self.results = Counter("medbridge_platform_results_bytes", "Bytes of job results read back and written",
                               ["direction"], registry=r)  # fmt: skip
        self.requests = Counter("medbridge_platform_requests", "SFTP requests received, by operation", ["op"],
                                registry=r)  # fmt: skip
        self.refusals = Counter("medbridge_platform_refusals", "Refusals recorded in the audit, by where and why",
                                ["action", "reason"], registry=r)  # fmt: skip
        self.certificates = Counter("medbridge_platform_certificates_issued", "Job certificates signed, "
                                    "renewals included", registry=r)  # fmt: skip
        self.renewals = Counter("medbridge_platform_certificates_renewed", "Job certificates signed for a job "
                                "that already had one", registry=r)  # fmt: skip
        self.audit_lag = Histogram("medbridge_platform_audit_write_lag_seconds", "Time from an audit event's "
                                   "record to its commit", buckets=LAG_BUCKETS, registry=r)  # fmt: skip
        self.audit_queue = Gauge("medbridge_platform_audit_queue_depth", "Audit events waiting to be written",
                                 multiprocess_mode="livesum", registry=r)  # fmt: skip
        self.audit_failing = Gauge("medbridge_platform_audit_failing", "1 while audit writes fail (decisions "
                                   "are refused meanwhile)", multiprocess_mode="livemax", registry=r)  # fmt: skip
        self._datasets: dict[str, Any] = {}
        self._ops: dict[str, Any] = {}
        self._read_results = self.results.labels("read")
        self._written = self.results.labels("written")

    # -- hooks: one call at each point that counts ----------------------------------------

    def request(self, pkttype: int, name: bytes = b"") -> None:
        """One SFTP request received (``name``: an extended request's); given by the session's RequestFilter."""
        op = op_name(pkttype, name)
        child = self._ops.get(op)
        if child is None:
            child = self._ops[op] = self.requests.labels(op)
        child.inc()

    def sent(self, vpath: str, n: int) -> None:
        """``n`` bytes of the file at ``vpath`` (a path policy allowed) were sent."""
        if vpath.startswith("/datasets/"):
            name = vpath.split("/", 3)[2]
            child = self._datasets.get(name)
            if child is None:
                child = self._datasets[name] = self.served.labels(name)
            child.inc(n)
        else:
            self._read_results.inc(n)

    def written(self, n: int) -> None:
        self._written.inc(n)

    def certificate(self, *, renewal: bool) -> None:
        self.certificates.inc()
        if renewal:
            self.renewals.inc()

    def refused(self, action: str, reason: str) -> None:
        """A refusal under ``action``; ``reason`` must already be one of :data:`REASONS`."""
        self.refusals.labels(action_label(action), reason).inc()

    def recorded(self, event: AuditEvent, waiting: int) -> None:
        """The audit sink queued ``event``; ``waiting`` events are now queued."""
        if event.outcome == "refused":
            self.refused(event.action, reason_code(event_reason(event.detail)))
        self.audit_queue.set(waiting)

    def settled(self, lags: Iterable[float], waiting: int, failing: bool) -> None:
        """The sink's writer finished a pass: each event's seconds in the queue, what still waits."""
        for lag in lags:
            self.audit_lag.observe(lag)
        self.audit_queue.set(waiting)
        self.audit_failing.set(1 if failing else 0)

    def value(self, name: str, **labels: str) -> float:
        """A sample's value in this process (0 if never counted): for tests and ``--json`` reports."""
        v = self.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v


_process: PlatformMetrics | None = None
_made = threading.Lock()


def process_metrics() -> PlatformMetrics:
    """This process's metrics, made on first use (in a worker: after the fork, so into its own files)."""
    global _process
    if _process is not None:
        return _process
    with _made:
        if _process is None:
            _process = PlatformMetrics()
        return _process


K = TypeVar("K")
V = TypeVar("V")


class SessionTable(dict[K, V]):
    """The platform's live sessions: a dict whose size is the ``sessions_open`` gauge, however it changes."""

    def __init__(self, metrics: PlatformMetrics):
        super().__init__()
        self._metrics = metrics

    def _changed(self, before: int) -> None:
        delta = len(self) - before
        if delta > 0:
            self._metrics.sessions.inc(delta)
        if delta:
            self._metrics.sessions_open.inc(delta)

    def __setitem__(self, key: K, value: V) -> None:
        before = len(self)
        super().__setitem__(key, value)
        self._changed(before)

    def __delitem__(self, key: K) -> None:
        before = len(self)
        super().__delitem__(key)
        self._changed(before)

    def pop(self, key: K, *default: Any) -> Any:
        before = len(self)
        value = super().pop(key, *default)
        self._changed(before)
        return value

    def popitem(self) -> tuple[K, V]:
        before = len(self)
        item = super().popitem()
        self._changed(before)
        return item

    def clear(self) -> None:
        before = len(self)
        super().clear()
        self._changed(before)

    def setdefault(self, key: K, default: Any = None) -> Any:
        before = len(self)
        value = super().setdefault(key, default)
        self._changed(before)
        return value

    def update(self, *args: Any, **kwargs: Any) -> None:
        before = len(self)
        super().update(*args, **kwargs)
        self._changed(before)


# -- the endpoint -------------------------------------------------------------------------


#: A scraper that stalls is dropped after this many seconds (one thread each while it lasts).
SCRAPE_TIMEOUT = 10


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class MetricsServer:
    """``/metrics`` over HTTP on an address the operator chose, from a thread of its own.

    Bound with :func:`medbridge.net.bind`, so a taken address is the same clear error
    as the data plane's.  ``registry`` is a process's own, or the workers' sum
    (:func:`workers_registry`).
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        from prometheus_client.exposition import MetricsHandler

        sock = bind(host, port, what="metrics")
        handler = type("Handler", (MetricsHandler,), {"registry": registry, "timeout": SCRAPE_TIMEOUT})
        try:
            self._httpd = _Server(sock.getsockname()[:2], handler, bind_and_activate=False)
            self._httpd.socket.close()
            self._httpd.socket = sock
            self._httpd.server_activate()
        except BaseException:
            sock.close()
            raise
        bound = sock.getsockname()
        self.address: tuple[str, int] = (bound[0], bound[1])
        if self.wildcard:
            log.warning("metrics served on every interface (%s): anyone who reaches this host may read them; "
                        "bind a management address instead", self.url, extra={"metrics": self.url})  # fmt: skip
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="medbridge-metrics", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{format_address(*self.address)}/metrics"

    @property
    def wildcard(self) -> bool:
        """Listening on every interface (0.0.0.0 or ::): reachable from wherever the host is."""
        return self.address[0] in ("0.0.0.0", "::")

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def forget_in_child(self) -> None:
        """In a forked child: close its copy of the listening socket (the parent keeps serving)."""
        self._httpd.socket.close()

    def stop(self) -> None:
        """Stop serving and free the address (also when it was never started)."""
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread.ident is not None:
            self._thread.join(timeout=5)


def workers_registry(folder: str) -> CollectorRegistry:
    """A registry that sums every worker's metrics from the multiprocess ``folder``."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=folder)  # type: ignore[no-untyped-call]
    return registry
