"""A link-emulation relay: TCP in, TCP out, every byte held back by a fixed one-way delay.

``tc netem`` is not available on these machines, so delay is added in user space.
Each direction has a reader that stamps chunks with their release time and a writer
that sleeps until then (``time.sleep`` wakes far closer to its deadline than asyncio's
millisecond-rounded timers), so a relay with one-way delay d adds 2d to a round trip.
Optionally caps bandwidth per direction.

Run it in a namespace with ``python -m medbridge.testing.delay --listen H:P --target H:P --delay-ms 2.5``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import socket
import sys
import threading
import time

from medbridge.net import parse_address


class DelayRelay:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int], delay: float, rate: float | None = None):
        self.target = target
        self.delay = delay
        self.rate = rate
        self.server = socket.create_server(listen, reuse_port=False)
        self.address = self.server.getsockname()[:2]
        self._stop = threading.Event()

    def serve_forever(self) -> None:
        self.server.settimeout(0.5)
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(client, upstream)
            for src, dst in ((client, upstream), (upstream, client)):
                self._direction(src, dst, pair)

    def _direction(self, src: socket.socket, dst: socket.socket, pair: _Pair) -> None:
        queue: collections.deque[tuple[float, bytes]] = collections.deque()
        ready = threading.Condition()

        def reader() -> None:
            while True:
                try:
                    data = src.recv(1 << 16)
                except OSError:
                    data = b""
                with ready:
                    queue.append((time.monotonic() + self.delay, data))
                    ready.notify()
                if not data:
                    return

        def writer() -> None:
            sent_until = time.monotonic()
            while True:
                with ready:
                    while not queue:
                        ready.wait()
                    due, data = queue.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    pair.done()
                    return
                if self.rate:
                    sent_until = max(sent_until, time.monotonic()) + len(data) / self.rate
                    pause = sent_until - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                try:
                    dst.sendall(data)
                except OSError:
                    with contextlib.suppress(OSError):
                        src.shutdown(socket.SHUT_RDWR)
                    pair.done()
                    return

        threading.Thread(target=reader, daemon=True).start()
        threading.Thread(target=writer, daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self.server.close()


class _Pair:
    """Both sockets of one relayed connection, closed once both directions are done."""

    def __init__(self, a: socket.socket, b: socket.socket):
        self.sockets = (a, b)
        self._left = 2
        self._lock = threading.Lock()

    def done(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            for s in self.sockets:
                s.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay per direction")
    parser.add_argument("--rate-mbit", type=float, default=None, help="bandwidth cap per direction")
    args = parser.parse_args(argv)
    rate = args.rate_mbit * 1e6 / 8 if args.rate_mbit else None
    listen, target = parse_address(args.listen, "--listen"), parse_address(args.target, "--target")
    relay = DelayRelay(listen, target, args.delay_ms / 1000.0, rate)
    print(
        f"delay relay {relay.address[0]}:{relay.address[1]} -> {args.target} +{args.delay_ms} ms each way", flush=True
    )
    with contextlib.suppress(KeyboardInterrupt):
        relay.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
