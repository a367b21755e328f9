"""The audit sink: the data plane's events, committed in groups, failing closed.

The data plane records an event for every decision; a request that waits on one
(its *owner*) is answered only once the event is committed (``audit_done``).
Events wait in one queue; a writer thread commits whatever is queued in one
transaction, so many decisions share one commit and throughput holds.

Nothing can stop the audit for good.  A batch that fails is split until the event
that fails alone is found; that event is recorded in its place as
``audit.unwritable`` (with its action and the error) and its owner refused, and the
others are written.  If even that cannot be written the store itself is failing:
every owner waiting is refused at once (so is every new one while it lasts), the
events are kept, marked as refused, and retried with back-off until a write
succeeds; the failure and the recovery are logged.  :meth:`AuditSink.close` writes
what is pending before the process ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from medbridge.control.audit import AuditEvent
from medbridge.control.store import Store
from medbridge.errors import AuditUnavailable
from medbridge.platform.metrics import process_metrics

log = logging.getLogger("medbridge.platform")
T = TypeVar("T")


class AuditOwner(Protocol):
    """A request waiting on its events: told of each, in the order recorded, once it is settled."""

    def audit_done(self, ticket: int, error: str | None) -> None:
        """``error`` is None once the event is committed, else why it was not (the request must be refused)."""


@dataclass(slots=True)
class _Item:
    ticket: int
    event: AuditEvent
    owner: AuditOwner | None
    #: When it was first queued (monotonic): its write lag is measured from here.
    since: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class _Failed:
    reason: str
    #: True when a placeholder (``audit.unwritable``) was written in the event's place.
    replaced: bool


class _Pledge:
    """The owner :meth:`AuditSink.pledge` (and so :meth:`AuditSink.commit`) waits on: None (committed) or why not."""

    def __init__(self, future: asyncio.Future[str | None]):
        self.future = future

    def audit_done(self, ticket: int, error: str | None) -> None:
        if not self.future.done():
            self.future.set_result(error)


def _now() -> datetime:
    return datetime.now(UTC)


def _lags(batch: Sequence[_Item], results: Sequence[_Failed | None]) -> list[float]:
    """Seconds each written event waited, from its first record to its commit."""
    now = time.monotonic()
    return [now - item.since for item, result in zip(batch, results, strict=True) if result is None]


def _refused(event: AuditEvent, reason: str) -> AuditEvent:
    """What an event becomes when the request that waited on it was refused because it could not be written.

    A change already made (``"acted"`` in its detail: a remove, a truncate) keeps its outcome:
    it happened, and the client was told it was refused.
    """
    if event.detail.get("acted"):
        note = f"written late: the first write failed ({reason}); the change was made, the client told it was refused"
        return dataclasses.replace(event, detail={**event.detail, "audit": note})
    note = f"written late: the first write failed ({reason}); the request was refused"
    outcome = "refused" if event.outcome == "ok" else event.outcome
    return dataclasses.replace(event, outcome=outcome, detail={**event.detail, "audit": note})


class AuditSink:
    """One process's audit writer: a queue, a thread and the back-off of a failing store."""

    #: Most events one transaction writes.
    max_batch = 2000
    #: Most events held while the store fails; beyond it the newest are counted as lost (their requests were refused).
    max_pending = 100_000
    #: Back-off between failed writes, seconds: first and longest.
    retry = (0.05, 2.0)

    def __init__(self, store: Store):
        self._store = store
        self._queue: deque[_Item] = deque()
        self._ticket = 0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="medbridge-audit")
        self._wake = asyncio.Event()
        self._settled = asyncio.Condition()
        self._busy = False
        self._attempts = 0
        self._task: asyncio.Task[None] | None = None
        self.metrics = process_metrics()
        #: Why writes fail now (None while they succeed): owners are refused at once meanwhile.
        self.failing: str | None = None
        #: Events committed, events replaced by ``audit.unwritable``, events lost to the bound while failing.
        self.written = 0
        self.replaced = 0
        self.lost = 0

    # -- recording ----------------------------------------------------------------------

    def record(self, event: AuditEvent, owner: AuditOwner | None = None) -> int:
        """Queue ``event``; ``owner`` (if any) is told once it is settled.  Returns its ticket."""
        if event.at is None:
            event = dataclasses.replace(event, at=_now())
        self._ticket += 1
        ticket = self._ticket
        if self.failing is not None and owner is not None:
            asyncio.get_running_loop().call_soon(owner.audit_done, ticket, self.failing)
            event, owner = _refused(event, self.failing), None
        self._queue.append(_Item(ticket, event, owner))
        self.metrics.recorded(event, len(self._queue))
        self._wake.set()
        return ticket

    async def commit(self, event: AuditEvent) -> None:
        """Record ``event`` and return once it is committed; :class:`AuditUnavailable` if it cannot be."""
        error = await self.pledge(event)
        if error is not None:
            raise AuditUnavailable(f"the audit could not record this: {error}")

    def pledge(self, event: AuditEvent) -> asyncio.Future[str | None]:
        """Record ``event``; the future says None once it is committed, or why it could not be.

        What a decision's reply waits on: many requests in flight share one commit.
        """
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.record(event, _Pledge(future))
        return future

    async def flush(self) -> None:
        """Return once everything recorded so far is written; :class:`AuditUnavailable` if the next write fails."""
        begun = self._attempts
        async with self._settled:
            while self._queue or self._busy:
                if self.failing is not None and self._attempts > begun:
                    raise AuditUnavailable(f"audit writes are failing: {self.failing}")
                await self._settled.wait()

    async def in_writer(self, work: Callable[[], T]) -> T:
        """Run ``work`` on the writer's thread, after what it is writing now (checkpoints)."""
        return await asyncio.get_running_loop().run_in_executor(self._writer, work)

    # -- writing ------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="medbridge-audit-writer")

    async def close(self, timeout: float = 10.0) -> None:
        """Write what is pending (retrying up to ``timeout``), then stop; what could not be written is logged."""
        try:
            await asyncio.wait_for(self._drained(), timeout)
        except TimeoutError:
            log.error("audit: %d event(s) could not be written before stopping: %s", len(self._queue), self.failing)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._writer.shutdown(wait=True)

    async def _drained(self) -> None:
        async with self._settled:
            await self._settled.wait_for(lambda: not self._queue and not self._busy)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.0
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            if delay:
                await asyncio.sleep(delay)
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch))]
            self._busy = True
            try:
                results = await loop.run_in_executor(self._writer, self._write, [i.event for i in batch])
            except asyncio.CancelledError:
                self._queue.extendleft(reversed(batch))  # still pending; close() says so
                raise
            finally:
                self._busy = False
            self._attempts += 1
            failed = self._settle(batch, results)
            self.metrics.settled(_lags(batch, results), len(self._queue), self.failing is not None)
            delay = 0.0 if not failed else min(max(delay * 2, self.retry[0]), self.retry[1])
            async with self._settled:
                self._settled.notify_all()

    def _settle(self, batch: Sequence[_Item], results: Sequence[_Failed | None]) -> bool:
        """Tell the owners; keep what the store refused.  True if the store is failing."""
        kept: list[_Item] = []
        for item, result in zip(batch, results, strict=True):
            if result is None:
                self.written += 1
            elif result.replaced:
                self.replaced += 1
                log.error("audit: an event (%s) could not be written and was replaced: %s",
                          ascii(item.event.action), result.reason)  # fmt: skip
            else:
                kept.append(item)
            if item.owner is not None:
                item.owner.audit_done(item.ticket, None if result is None else result.reason)
                if result is not None and not result.replaced:
                    item.event, item.owner = _refused(item.event, result.reason), None
        if not kept:
            if self.failing is not None:
                log.warning("audit: writes succeed again (%d event(s) lost while they failed)", self.lost)
                self.failing = None
                if self.lost:
                    self.record(AuditEvent(actor="platform", action="audit.lost", outcome="error",
                                           detail={"events": self.lost}))  # fmt: skip
                    self.lost = 0
            return False
        reason = next(r.reason for r in results if r is not None and not r.replaced)
        if self.failing is None:
            log.error("audit: writes fail (%s); requests are refused until they succeed", reason)
        self.failing = reason
        for item in self._queue:  # every request waiting is refused now, not when its turn comes
            if item.owner is not None:
                item.owner.audit_done(item.ticket, reason)
                item.event, item.owner = _refused(item.event, reason), None
        self._queue.extendleft(reversed(kept))
        while len(self._queue) > self.max_pending:
            self._queue.pop()
            self.lost += 1
        return True

    def _write(self, events: Sequence[AuditEvent]) -> list[_Failed | None]:
        """Write ``events`` in order; split a failing batch to find the events that fail alone."""
        try:
            self._store.audit(events, _now())
            return [None] * len(events)
        except Exception as exc:  # whatever the store raised: isolate it below, never let it stop the others
            if len(events) == 1:
                return [self._write_instead(events[0], exc)]
        mid = len(events) // 2
        left = self._write(events[:mid])
        failing = next((r for r in left if r is not None and not r.replaced), None)
        if failing is not None:
            return [*left, *([failing] * (len(events) - mid))]
        return [*left, *self._write(events[mid:])]

    def _write_instead(self, event: AuditEvent, exc: Exception) -> _Failed:
        """Record that ``event`` could not be written; if even that fails, the store itself is failing."""
        reason = f"{type(exc).__name__}: {exc}"[:500]
        placeholder = AuditEvent(
            actor=ascii(event.actor)[1:-1],
            action="audit.unwritable",
            outcome="error",
            subject=ascii(event.subject)[1:-1],
            detail={"action": ascii(event.action)[1:-1], "outcome": ascii(event.outcome)[1:-1], "error": reason},
            at=event.at,
        )
        try:
            self._store.audit([placeholder], _now())
        except Exception as again:  # the store refuses anything: report it, the caller keeps the event
            return _Failed(f"{type(again).__name__}: {again}"[:500], replaced=False)
        return _Failed(reason, replaced=True)
