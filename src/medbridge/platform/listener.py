"""Accepting connections: the PROXY v2 header from trusted gateways, then SSH.

A gateway in front of the platform would make every client look like the gateway,
so certificate ``source-address`` checks and the audit log would lose the real
origin.  Trusted gateways send a PROXY v2 header first; the listener reads it and
hands asyncssh a socket whose peer name *is* the carried client address, so
asyncssh's own ``source-address`` check and the audit both see the compute node.
Anyone else who sends a PROXY header is refused and audited.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence

from medbridge.descriptors import EXHAUSTED, Reserve, error_name, next_backoff
from medbridge.gateway import proxy
from medbridge.net import Network, in_networks

log = logging.getLogger("medbridge.platform")

HEADER_TIMEOUT = 5.0
#: How long to wait for a client's first bytes before deciding it sent no PROXY header.
PEEK_TIMEOUT = 2.0


class CarriedPeerSocket(socket.socket):
    """A connected socket that reports the client address a PROXY header carried."""

    def __init__(self, fileno: int, family: int, peer: tuple[str, int]):
        super().__init__(family, socket.SOCK_STREAM, 0, fileno)
        self._carried = peer

    def getpeername(self) -> tuple[str, int]:
        return self._carried


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        if not chunk:
            raise proxy.ProxyHeaderError("connection closed inside the PROXY header")
        data += chunk
    return data


async def _peek(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int, timeout: float) -> bytes:
    """The first bytes the client sent, without consuming them ('' if it sent nothing in time)."""
    fut: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(sock.fileno(), readable)
    try:
        await asyncio.wait_for(fut, timeout)
    except TimeoutError:
        return b""
    finally:
        loop.remove_reader(sock.fileno())
    try:
        return sock.recv(n, socket.MSG_PEEK)
    except BlockingIOError:
        return b""


async def accept_forever(
    listener: socket.socket,
    proxies: Sequence[Network],
    serve: Callable[[socket.socket, tuple[str, int], tuple[str, int] | None], Awaitable[None]],
    refuse: Callable[[tuple[str, int], str], None],
    exhausted: Callable[[str, int], None] = lambda error, refused: None,
) -> None:
    """Accept connections; for each, settle the client address and ``serve(sock, client, via)``.

    No error of ``accept()`` ends the loop.  Out of descriptors (EMFILE, ENFILE), the
    connections waiting are accepted with a reserve descriptor and closed, reported as
    ``exhausted(errno name, how many)``, and accepting resumes after a back-off that
    doubles while it lasts; any other error concerns one client and is skipped.
    """
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    reserve = Reserve()

    async def one(sock: socket.socket, peer: tuple[str, int]) -> None:
        try:
            if in_networks(peer[0], proxies):
                try:
                    header = await asyncio.wait_for(_recv_exactly(loop, sock, proxy.HEADER_LEN), HEADER_TIMEOUT)
                    body = await asyncio.wait_for(_recv_exactly(loop, sock, proxy.body_length(header)), HEADER_TIMEOUT)
                    info = proxy.decode(header, body)
                except (proxy.ProxyHeaderError, TimeoutError, OSError) as exc:
                    refuse(peer, f"bad PROXY header from a trusted gateway: {exc}")
                    sock.close()
                    return
                client = info.source or peer
                carried = CarriedPeerSocket(sock.detach(), sock.family, client)
                await serve(carried, client, peer)
                return
            head = await _peek(loop, sock, len(proxy.SIGNATURE), PEEK_TIMEOUT)
            if head and proxy.SIGNATURE.startswith(head[: len(proxy.SIGNATURE)]) and len(head) >= 5:
                refuse(peer, "PROXY header from an untrusted address")
                sock.close()
                return
            await serve(sock, peer, None)
        except Exception as exc:  # one connection's failure must never stop the accept loop
            log.debug("connection from %s ended: %s", peer, exc)
            sock.close()

    backoff = 0.0
    try:
        while True:
            try:
                sock, addr = await loop.sock_accept(listener)
            except OSError as exc:
                if listener.fileno() < 0:  # closed: the platform is stopping
                    return
                if exc.errno not in EXHAUSTED:  # ECONNABORTED, EPERM, EPROTO: that client only
                    log.debug("accept failed: %s", exc)
                    continue
                exhausted(error_name(exc), reserve.shed(listener))
                backoff = next_backoff(backoff)
                await asyncio.sleep(backoff)
                continue
            backoff = 0.0
            task = asyncio.create_task(one(sock, (addr[0], addr[1])))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        reserve.close()
