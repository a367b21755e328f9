"""Coalesced socket writes and sealed channel data: in order, intact for real SSH clients, nothing lost."""

from __future__ import annotations

import array
import asyncio
import getpass
import hashlib
import os
import random
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncssh
import pytest
from asyncssh.constants import MSG_CHANNEL_DATA
from asyncssh.encryption import GCMEncryption
from asyncssh.packet import Byte, String, UInt32

from medbridge import fastpath
from medbridge.fastpath import SealingChannel, coalesce, sealing_channel
from medbridge.loader import Loader
from medbridge.testing import RunningPlatform
from medbridge.transport import CoalescingTransport
from tests.conftest import CHEST


async def _pair() -> tuple[CoalescingTransport, asyncio.StreamReader, asyncio.StreamWriter]:
    """A real loopback TCP connection: a coalesced protocol side and a plain stream side."""
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Future()
    server = await asyncio.start_server(lambda r, w: accepted.set_result((r, w)), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    reader, writer = await accepted
    server.close()
    assert isinstance(transport, asyncio.Transport)
    return CoalescingTransport(transport, loop), reader, writer


def test_writes_of_one_pass_leave_in_one_send_in_order() -> None:
    parts = [os.urandom(n) for n in range(1, 60)]

    async def run() -> tuple[bytes, int, int]:
        t, reader, writer = await _pair()
        for p in parts:
            t.write(p)
        assert t.sends == 0 and t.get_write_buffer_size() == sum(map(len, parts))  # nothing sent within the pass
        got = await reader.readexactly(sum(map(len, parts)))
        t.close()
        writer.close()
        return got, t.sends, t.packets

    got, sends, packets = asyncio.run(run())
    assert got == b"".join(parts)
    assert (sends, packets) == (1, len(parts))


def test_close_and_abort_send_what_is_pending_first() -> None:
    async def run(how: str) -> bytes:
        t, reader, writer = await _pair()
        t.write(b"last ")
        t.write(b"words")
        getattr(t, how)()
        got = await reader.read()  # to EOF: the pending bytes came before the end
        writer.close()
        return got

    assert asyncio.run(run("close")) == b"last words"
    assert asyncio.run(run("abort")) == b"last words"


def test_platform_and_loader_connections_are_coalesced_and_sealed(platform: RunningPlatform) -> None:
    """Guards the asyncssh attributes coalesce() and SealingChannel use: if a release renames them, this fails.

    Off the fast path (MEDBRIDGE_FASTPATH=off), the same reads go through asyncssh's own
    transport and channels: nothing is coalesced or sealed, and the bytes are the same.
    """
    names = ["scan-001.bin", "scan-002.bin", "labels/readme.txt"]
    with platform.job_endpoint("alice") as ep, Loader(ep, connections=1, verify=True) as loader:
        got = list(loader.read_many([f"/datasets/chest/{n}" for n in names * 5]))
        pool = loader._runtime()[1]
        client = [s.conn._transport for s in pool.slots if s.conn is not None]  # type: ignore[attr-defined]
        servers = [owner.transport for owner in platform.background.platform.sessions]
        channels = [chan for owner in platform.background.platform.sessions for chan in owner.channels]
    assert [bytes(b) for b in got] == [CHEST[n] for n in names * 5]
    assert client and servers and channels
    if not fastpath.enabled():
        assert not any(isinstance(t, CoalescingTransport) for t in client) and servers == [None] * len(servers)
        assert not any(isinstance(c, SealingChannel) for c in channels)
        return
    assert all(isinstance(t, CoalescingTransport) and t.packets > t.sends > 0 for t in client)
    assert all(t is not None and t.packets > t.sends > 0 for t in servers)
    # the replies were sealed in place (the session channels' data left through SealingChannel)
    assert all(isinstance(c, SealingChannel) for c in channels)
    assert sum(c.sealed for c in channels) > sum(map(len, got))


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path's own code, tested whatever this process's gate says (CI runs this file with it on)."""
    monkeypatch.setattr(fastpath, "enabled", lambda: True)


# -- sealed channel data --------------------------------------------------------------------


class _Stream(asyncssh.SSHServerSession[bytes]):
    """Writes ``data`` in pieces of uneven sizes (tiny, odd, several packets long), then exits."""

    def __init__(self, data: Any, paced: bool):
        self._data = data
        self._paced = paced

    def connection_made(self, chan: Any) -> None:
        self._chan = chan

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        return True

    def eof_received(self) -> bool:
        return True  # the client's stdin ended; keep sending

    def session_started(self) -> None:
        if self._paced:
            self._task = asyncio.get_running_loop().create_task(self._paced_writes())
            return
        for piece in self._pieces():
            self._chan.write(piece)
        self._chan.exit(0)

    def _pieces(self) -> Iterator[Any]:
        if isinstance(self._data, list):  # written as given
            yield from self._data
            return
        rng, pos = random.Random(7), 0
        while pos < len(self._data):
            n = rng.choice([1, 13, 4_000, 32_768, 32_781, 100_000, 300_000])
            yield self._data[pos : pos + n]
            pos += n

    async def _paced_writes(self) -> None:
        """The same pieces, giving the loop a pass between them (so key exchanges land mid-stream)."""
        for piece in self._pieces():
            self._chan.write(piece)
            await asyncio.sleep(0.001)
        self._chan.exit(0)


class _Server(asyncssh.SSHServer):
    def __init__(self, data: Any, channels: list[SealingChannel], paced: bool):
        self._data = data
        self._channels = channels
        self._paced = paced

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        coalesce(conn)
        self._conn = conn

    def begin_auth(self, username: str) -> bool:
        return True

    def session_requested(self) -> Any:
        chan = sealing_channel(self._conn)
        assert isinstance(chan, SealingChannel)
        self._channels.append(chan)
        return chan, _Stream(self._data, self._paced)


async def _serve(
    tmp: Path, data: Any, paced: bool = False, **options: Any
) -> tuple[asyncssh.SSHAcceptor, list[SealingChannel], Path]:
    """A real asyncssh server on loopback streaming ``data`` on every session; its client key is ``tmp/client``."""
    client = asyncssh.generate_private_key("ssh-ed25519")
    (tmp / "client").write_bytes(client.export_private_key())
    (tmp / "client").chmod(0o600)
    host = asyncssh.generate_private_key("ssh-ed25519")
    channels: list[SealingChannel] = []
    acceptor = await asyncssh.listen(
        "127.0.0.1", 0, server_host_keys=[host], authorized_client_keys=asyncssh.import_authorized_keys(
            client.export_public_key().decode()), server_factory=lambda: _Server(data, channels, paced), encoding=None,
        **options,
    )  # fmt: skip
    port = acceptor.sockets[0].getsockname()[1]
    (tmp / "known_hosts").write_text(f"[127.0.0.1]:{port} {host.export_public_key().decode()}")
    return acceptor, channels, tmp / "client"


@pytest.mark.parametrize(
    ("server_options", "client_options", "paced"),
    [({"rekey_bytes": 2 << 20}, [], False), ({}, ["-o", "RekeyLimit=1M"], True)],
    ids=["server-starts-key-exchanges", "client-starts-key-exchanges"],
)
@pytest.mark.usefixtures("fast")
def test_openssh_reads_sealed_data_intact_across_key_exchanges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server_options: dict[str, Any], client_options: list[str],
    paced: bool,
) -> None:  # fmt: skip
    """OpenSSH's own ssh checks every packet's tag and sequence: one wrong byte, nonce or count and it fails.

    And no data is sealed while a key exchange is under way (RFC 4253 7.1), which the
    clients would not notice: the sealed path is watched from outside.
    """
    data = os.urandom(12 << 20)
    during_kex: list[int] = []
    seal = SealingChannel._seal

    def watched(chan: SealingChannel, view: memoryview) -> int:
        conn: Any = chan._conn
        kex = not conn._kex_complete or bool(conn._deferred_packets)
        sent = seal(chan, view)
        if sent and kex:
            during_kex.append(sent)
        return sent

    monkeypatch.setattr(SealingChannel, "_seal", watched)

    async def run() -> tuple[bytes, list[SealingChannel]]:
        acceptor, channels, key = await _serve(tmp_path, data, paced, **server_options)
        port = acceptor.sockets[0].getsockname()[1]
        try:
            proc = await asyncio.create_subprocess_exec(
                "ssh", "-F", "/dev/null", "-p", str(port), "-i", str(key), "-o", "IdentitiesOnly=yes",
                "-o", "IdentityAgent=none", "-o", f"UserKnownHostsFile={tmp_path / 'known_hosts'}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "Ciphers=aes128-gcm@openssh.com",
                *client_options, f"{getpass.getuser()}@127.0.0.1", "stream",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err.decode()
            return out, channels
        finally:
            acceptor.close()
            await acceptor.wait_closed()

    out, channels = asyncio.run(run())
    assert hashlib.sha256(out).digest() == hashlib.sha256(data).digest() and len(out) == len(data)
    (chan,) = channels
    assert type(chan) is SealingChannel
    # most of it; what was queued when a key exchange fell due took asyncssh's path
    assert chan.sealed > len(data) * 0.75
    assert chan.keys >= 4  # 12 MiB at a 1-2 MiB rekey limit: sealed under several keys in turn
    assert during_kex == []


@pytest.mark.parametrize(
    ("options", "sealed"),
    [
        # queued for the window, then sealed from the queue
        ({"window": 64 * 1024, "max_pktsize": 4096, "encryption_algs": ["aes128-gcm@openssh.com"]}, True),
        ({"encryption_algs": ["chacha20-poly1305@openssh.com"]}, False),  # another cipher: asyncssh's path
        ({"encryption_algs": ["aes256-gcm@openssh.com"], "compression_algs": ["zlib"]}, False),
    ],
    ids=["small-window", "chacha20", "compressed"],
)
@pytest.mark.usefixtures("fast")
def test_data_arrives_in_order_whatever_the_path(tmp_path: Path, options: dict[str, Any], sealed: bool) -> None:
    data = os.urandom(3 << 20)
    out, chan, (sent, received) = asyncio.run(_fetch(tmp_path, data, options))
    assert out == data
    assert sent == received
    assert (chan.sealed == len(data)) if sealed else (chan.sealed == 0), (chan.sealed, len(data))


@pytest.mark.usefixtures("fast")
def test_a_view_of_wider_items_is_sent_whole(tmp_path: Path) -> None:
    """A window counts bytes, a memoryview of 16-bit items counts items: such a view takes asyncssh's path."""
    data = memoryview(array.array("H", os.urandom(1 << 20)))
    options = {"window": len(data), "encryption_algs": ["aes128-gcm@openssh.com"]}  # the window: half the bytes
    out, _, (sent, received) = asyncio.run(_fetch(tmp_path, [data], options))
    assert out == data.tobytes()
    assert sent == received


async def _fetch(tmp: Path, data: Any, options: dict[str, Any]) -> tuple[bytes, SealingChannel, tuple[int, int]]:
    """What an asyncssh client with ``options`` reads of ``data``, the channel, and packets sent and received."""
    acceptor, channels, key = await _serve(tmp, data, compression_algs=["zlib", "none"])
    port = acceptor.sockets[0].getsockname()[1]
    try:
        async with asyncssh.connect(
            "127.0.0.1", port, username="x", client_keys=[str(key)], known_hosts=str(tmp / "known_hosts"), **options,
        ) as conn:  # fmt: skip
            result = await conn.run("stream", encoding=None, check=True)
            # the channel is closed on both sides: every packet the server counted, the client counted
            counts = (channels[0]._conn._send_seq, conn._recv_seq)  # type: ignore[attr-defined]
        assert isinstance(result.stdout, bytes)
        return result.stdout, channels[0], counts
    finally:
        acceptor.close()
        await acceptor.wait_closed()


def test_sealed_packets_are_what_asyncssh_would_encrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Byte for byte: the packets asyncssh's own GCM encryption makes of the same frames, nonce and counters.

    The connection here is a stand-in holding the state the sealed path reads and
    advances; the encryption objects are asyncssh's.  Padding is fixed so both sides
    can be compared.
    """
    key, iv, seq = os.urandom(16), os.urandom(12), 0xFFFFFFFE  # the sequence number wraps on the way
    monkeypatch.setattr(fastpath.os, "urandom", lambda n: b"\x5a" * n)
    sent: list[bytes] = []
    conn = SimpleNamespace(
        _send_encryption=GCMEncryption.new("aes128-gcm", key, iv), _transport=object(), _compressor=None,
        _kex_complete=True, _deferred_packets=[], _send_enchdrlen=1, _send_blocksize=16, _rekey_bytes_sent=5,
        _rekey_bytes=1 << 30, _rekey_seconds=0, _rekey_time=0.0, _send_seq=seq, _send=sent.append,
    )  # fmt: skip
    chan = object.__new__(SealingChannel)
    chan._conn, chan._send_window, chan._send_pktsize, chan._send_chan = conn, 100_000, 32_768, 3  # type: ignore[assignment]
    data = os.urandom(70_000)

    assert chan._seal(memoryview(data)) == len(data)

    ref = GCMEncryption.new("aes128-gcm", key, iv)
    expected, framed = b"", 0
    for i, start in enumerate(range(0, len(data), 32_768)):
        payload = Byte(MSG_CHANNEL_DATA) + UInt32(3) + String(data[start : start + 32_768])
        pad = -(1 + len(payload)) % 16  # asyncssh's send_packet: enchdrlen 1, block 16, at least 4
        pad += 16 if pad < 4 else 0
        packet = Byte(pad) + payload + b"\x5a" * pad
        ciphertext, mac = ref.encrypt_packet((seq + i) & 0xFFFFFFFF, UInt32(len(packet)), packet)
        expected += ciphertext + mac
        framed += len(packet)
    assert [bytes(b) for b in sent] == [expected]
    assert conn._send_encryption._cipher._iv == ref._cipher._iv  # type: ignore[attr-defined]
    assert (conn._send_seq, conn._rekey_bytes_sent, chan._send_window) == (1, 5 + framed, 100_000 - len(data))
