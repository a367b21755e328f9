"""How much CPU the gateway spends per GB relayed, against a plain Python asyncio relay in the same run.

Both relays run as processes of their own between a client and a sink on loopback;
their CPU time is read from /proc before and after each transfer.  Runs are
interleaved and repeated; medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medbridge import processes
from medbridge.errors import PlatformUnavailable
from medbridge.processes import cpu_seconds

CHUNK = 1 << 20


class Sink:
    """Accepts connections and discards what they send."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    @staticmethod
    def _drain(conn: socket.socket) -> None:
        buf = bytearray(CHUNK)
        with conn:
            while conn.recv_into(buf):
                pass
            conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.server.close()


def push(port: int, total: int) -> float:
    """Send ``total`` bytes through ``port`` and wait for the far end to finish; seconds taken."""
    block = os.urandom(CHUNK)
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        sent = 0
        while sent < total:
            s.sendall(block)
            sent += len(block)
        s.shutdown(socket.SHUT_WR)
        while s.recv(CHUNK):
            pass
    return time.perf_counter() - start


async def _asyncio_peer(listen_port: int, target: int) -> None:
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        writer.close()
        up_writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def _start(cmd: list[str], words: str) -> tuple[subprocess.Popen[str], int]:
    """Start a relay process and read its port from the line that contains ``words``."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if words not in line:
        proc.kill()
        proc.wait()
        raise PlatformUnavailable(f"relay did not start: {line.strip()!r}")
    after = line.split(words, 1)[1].split()[0]
    return proc, int(after.rsplit(":", 1)[-1])


def run(total_mb: int, repeats: int, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    sink = Sink()
    work = Path(tempfile.mkdtemp(prefix="medbridge-bench-relay-"))
    cfg = work / "gateway.toml"
    cfg.write_text(f'[[route]]\nname = "bench"\nlisten = "127.0.0.1:0"\nbackends = ["127.0.0.1:{sink.port}"]\n'
                   'allow = ["127.0.0.0/8"]\nrequire_ssh = false\n')  # fmt: skip
    gateway, gport = _start([sys.executable, "-m", "medbridge", "gateway", "serve", "--config", str(cfg)],
                            "listening on")  # fmt: skip
    peer, pport = _start([sys.executable, "-m", "medbridge.bench.relay", "--asyncio-peer", str(sink.port)],
                         "listening")  # fmt: skip
    total = total_mb * CHUNK
    results: dict[str, list[tuple[float, float]]] = {"medbridge-gateway": [], "python-asyncio": []}
    try:
        for i in range(repeats):
            for name, proc, port in (("medbridge-gateway", gateway, gport), ("python-asyncio", peer, pport)):
                before = cpu_seconds(proc.pid)
                seconds = push(port, total)
                cpu = cpu_seconds(proc.pid) - before
                results[name].append((seconds, cpu))
                if progress:
                    progress(f"{name} run {i + 1}/{repeats}: {total_mb / seconds:.0f} MB/s, {cpu:.2f} CPU-s")
    finally:
        for proc in (gateway, peer):
            processes.stop(proc, timeout=20)
            if proc.stdout:
                proc.stdout.close()
        sink.close()
        cfg.unlink()
        work.rmdir()
    gb = total / 1e9
    rows = []
    for name, runs in results.items():
        rows.append({
            "relay": name,
            "mb_per_s": round(statistics.median(total / 1e6 / s for s, _ in runs), 1),
            "cpu_s_per_gb": round(statistics.median(c / gb for _, c in runs), 3),
            "runs": len(runs),
        })  # fmt: skip
    return {"bytes": total, "repeats": repeats, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--asyncio-peer", type=int, required=True, help="target port")
    args = parser.parse_args()
    asyncio.run(_asyncio_peer(0, args.asyncio_peer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
