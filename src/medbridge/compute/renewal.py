"""Certificate renewal: a job's certificate is renewed before it ends, for as long as policy allows."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from medbridge.compute.credentials import JobCredential
from medbridge.errors import AccessDenied, MedbridgeError


def seconds_left(valid_before: str) -> float:
    """Seconds until a certificate's ``valid_before`` (negative once it has passed)."""
    return (datetime.fromisoformat(valid_before) - datetime.now(UTC)).total_seconds()


class Renewer(threading.Thread):
    """Renews the job certificate when a third of its life is left, while grants allow.

    ``certify`` asks the issuer for a fresh certificate (and loads it where the job
    uses it).  A refusal ends renewal for good (the platform said no); any other
    failure is retried while the current certificate lasts.
    """

    def __init__(
        self,
        first: JobCredential,
        certify: Callable[[], Coroutine[Any, Any, JobCredential]],
        say: Callable[[str], None],
    ):
        super().__init__(name="medbridge-renewal", daemon=True)
        self.current = first
        self.renewals = 0
        self.refused: str | None = None
        self._certify = certify
        self._say = say
        self._halt = threading.Event()

    def run(self) -> None:
        life = max(3.0, seconds_left(self.current.valid_before) + 30)
        while not self._halt.wait(max(0.5, seconds_left(self.current.valid_before) - life / 3)):
            try:
                cred = asyncio.run(self._certify())
            except AccessDenied as exc:
                self.refused = str(exc)
                self._say(f"certificate renewal refused: {exc}; data access ends at {self.current.valid_before}")
                return
            except MedbridgeError as exc:
                self._say(f"certificate renewal failed, will retry: {exc}")
                self._halt.wait(min(30.0, max(1.0, seconds_left(self.current.valid_before) / 4)))
                continue
            self.current = cred
            self.renewals += 1

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout=30)
