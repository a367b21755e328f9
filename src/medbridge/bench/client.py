"""A benchmark's loader as a process of its own: connected once, then one timed pass per command.

Run as ``python -m medbridge.bench.client`` (under ``ip netns exec`` to read from another
site).  A line of JSON on stdin says where the platform is; the client opens its
connections, fetches its sample lists, reads a warm-up window of each, and says
``ready``.  Then ``go DATA`` reads every sample of ``DATA`` (``shards``, ``small`` or
``large``; ``fsspec`` is ``small`` through ``medbridge://``'s ``cat_ranges``), verified
against the manifest, and answers one line of JSON (a
:class:`Pass`); ``quit`` or the end of stdin ends it.  Its own CPU time is in the
answer, so a benchmark counts the reader's cost even when it cannot see its PID's tree.
"""

from __future__ import annotations

import contextlib
import json
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import IO, Any

import asyncssh

from medbridge.compute.session import Endpoint
from medbridge.errors import MedbridgeError

DATA = ("shards", "small", "large")  # and "fsspec": small through medbridge:// (bench io)
TIMEOUT = 600.0  # the longest a pass may take before the benchmark gives up on the client


@dataclass(frozen=True)
class Pass:
    """One client's pass over the data: what it read, when (CLOCK_MONOTONIC, one clock for all processes), its CPU."""

    files: int
    nbytes: int
    start: float
    end: float
    cpu_s: float


class Client:
    """One client process, spoken to a line at a time; its stderr kept for the line that says why it failed."""

    def __init__(self, ep: Endpoint, *, connections: int, window: int, data: Sequence[str],
                 prefix: Sequence[str] = ()):  # fmt: skip
        spec = {"host": ep.host, "port": ep.port, "user": ep.user, "agent": ep.agent,
                "host_key": ep.host_key.export_public_key().decode(), "connections": connections,
                "window": window, "data": list(data)}  # fmt: skip
        self.err = tempfile.TemporaryFile()  # noqa: SIM115  (closed in close())
        cmd = [*prefix, sys.executable, "-m", "medbridge.bench.client"]
        pipe = subprocess.PIPE
        self.proc = subprocess.Popen(cmd, stdin=pipe, stdout=pipe, stderr=self.err, text=True)
        try:
            self.send(json.dumps(spec))
        except BaseException:
            self.close()
            raise

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise MedbridgeError(f"a benchmark client has gone: {self.why()}") from exc

    def answer(self) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise MedbridgeError(f"a benchmark client gave no answer: {self.why()}")
        return line.strip()

    def why(self) -> str:
        self.stop()
        self.err.seek(0)
        last = [line for line in self.err.read().decode(errors="replace").splitlines() if line.strip()]
        return last[-1] if last else f"exit status {self.proc.returncode}"

    def stop(self, grace: float = 0.0) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        self.stop(grace=10)
        for stream in (self.proc.stdin, self.proc.stdout, self.err):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()


@contextlib.contextmanager
def clients(ep: Endpoint, count: int, *, connections: int, window: int, data: Sequence[str],
            prefix: Sequence[str] = ()) -> Iterator[list[Client]]:  # fmt: skip
    """``count`` client processes, each connected and holding its sample lists, ready for ``go``."""
    made: list[Client] = []
    try:
        for _ in range(count):
            made.append(Client(ep, connections=connections, window=window, data=data, prefix=prefix))
        for c in made:
            if c.answer() != "ready":
                raise MedbridgeError("a benchmark client did not get ready")
        yield made
    finally:
        for c in made:
            c.close()


def together(running: Sequence[Client], data: str) -> list[Pass]:
    """One pass of ``data`` by every client, started as close together as the pipes allow."""
    for c in running:
        c.send(f"go {data}")
    return [Pass(**json.loads(c.answer())) for c in running]


def main(stdin: IO[str], stdout: IO[str]) -> None:
    from medbridge.loader import Loader

    spec = json.loads(stdin.readline())
    key = asyncssh.import_public_key(spec["host_key"])
    ep = Endpoint(spec["host"], spec["port"], spec["user"], key, spec["agent"])
    with Loader(ep, connections=spec["connections"], window=spec["window"]) as loader:
        items: dict[str, list[Any]] = {
            "shards": loader.shard_samples("small") if "shards" in spec["data"] else [],
            "small": loader.files("small") if {"small", "fsspec"} & set(spec["data"]) else [],
            "large": loader.files("large") if "large" in spec["data"] else [],
        }
        items["fsspec"] = items["small"]
        read: dict[str, Callable[[list[Any]], Iterable[Any]]] = {name: loader.read_many for name in (*DATA, "fsspec")}
        if "fsspec" in spec["data"]:
            from medbridge.loader.filesystem import MedbridgeFileSystem

            fs = MedbridgeFileSystem(loader, environ={}, skip_instance_cache=True)
            read["fsspec"] = lambda paths: fs.cat_ranges(paths, None, None, on_error="raise")
        for name in spec["data"]:  # every connection opened and warm before the first timed pass
            sum(len(b) for b in read[name](items[name][: 2 * spec["window"]]))
        stdout.write("ready\n")
        stdout.flush()
        for line in stdin:
            command, _, data = line.strip().partition(" ")
            if command != "go":
                break
            cpu0, start = time.process_time(), time.monotonic()
            nbytes = sum(len(b) for b in read[data](items[data]))
            end = time.monotonic()
            result = Pass(len(items[data]), nbytes, start, end, time.process_time() - cpu0)
            stdout.write(json.dumps(asdict(result)) + "\n")
            stdout.flush()


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):
        main(sys.stdin, sys.stdout)
