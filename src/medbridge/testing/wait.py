"""Waiting on the event itself, never for a fixed time: a condition polled, or a line a process prints.

The timeouts here only bound a hang; they are generous because the machine may be busy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import IO, TypeVar

T = TypeVar("T")

#: How long a test waits for something that should happen at once on a quiet machine.
HANG = 120.0


def until(predicate: Callable[[], T], what: str, timeout: float = HANG, interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something true, and return that; TimeoutError names ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(interval)


class Lines:
    """A text stream (a process's stdout or stderr) read in a thread, its lines kept for waiting on."""

    def __init__(self, stream: IO[str]):
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._ended = False
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for(self, text: str, timeout: float = HANG) -> str:
        """The first line holding ``text``, waiting for it; an error if the stream ends or time runs out first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                left = deadline - time.monotonic()
                if self._ended or left <= 0:
                    why = "the stream ended" if self._ended else f"waited {timeout:.0f} s"
                    raise AssertionError(f"no line with {text!r} ({why}):\n{self.text}")
                self._changed.wait(left)

    def join(self, timeout: float = HANG) -> str:
        """Wait for the stream's end (its process has exited) and return all it said."""
        self._thread.join(timeout)
        return self.text

    @property
    def text(self) -> str:
        return "".join(self.lines)
