"""The fast path: every use of asyncssh's private state, behind one version gate.

asyncssh offers no public hook for its transport, its channel's packet layer or its
SFTP server's request handlers.  The platform and the loader reach into them here, and
only here, for speed and for the ``read-file@medbridge`` extension:

- :func:`coalesce` puts a :class:`~medbridge.transport.CoalescingTransport` under a
  connection (its private ``_transport``);
- :class:`SealingChannel` seals a channel's AES-GCM packets in place, advancing the
  connection's private key, nonce, sequence and rekey state as asyncssh does;
- :func:`start_sftp` serves an SFTP session with :class:`SFTPHandler` (asyncssh's
  private server handler, extended): READs answered in place, replies of one loop pass
  joined, and the ``read-file@medbridge`` extension.

:func:`enabled` decides once per process: the fast path runs only on an asyncssh release
in :data:`TESTED` (the range CI runs it on) and unless ``MEDBRIDGE_FASTPATH=off``.
Otherwise every caller takes asyncssh's public path (its own channels, transport and SFTP
server handler) and one warning says why.  Nothing that guards data lives here: refusals,
limits, the frozen results and the audit are the platform's own code on either path
(``medbridge.platform.sftp``), and CI runs the data-plane tests on both.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, Protocol, cast, runtime_checkable

import asyncssh
from asyncssh.constants import FXP_DATA, FXP_READ, MSG_CHANNEL_DATA
from asyncssh.crypto.cipher import GCMCipher
from asyncssh.encryption import GCMEncryption
from asyncssh.packet import PacketDecodeError, SSHPacket
from asyncssh.sftp import MAX_SFTP_PACKET_LEN, MAX_SFTP_WRITE_LEN, SFTPLimits, SFTPServerHandler
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medbridge.config import READ_FILE_EXTENSION
from medbridge.transport import CoalescingTransport, PassJoiner

log = logging.getLogger("medbridge.fastpath")

#: The asyncssh releases the fast path is tested on: from the first, up to (not including) the second.
#: pyproject.toml pins asyncssh to the same range; widen both only after CI passed on the new release.
TESTED = ((2, 23, 1), (2, 25, 0))
#: ``MEDBRIDGE_FASTPATH=off`` (or 0, no, false) takes asyncssh's public path whatever the release.
ENVIRONMENT = "MEDBRIDGE_FASTPATH"


def _release(version: str) -> tuple[int, ...] | None:
    """``2.24.1`` as (2, 24, 1); None for anything else (a pre-release, a local build)."""
    parts = version.split(".")
    if not 2 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        return None
    return tuple(int(p) for p in parts) + (0,) * (3 - len(parts))


def decide(version: str, environ: Mapping[str, str]) -> tuple[bool, str]:
    """Whether the fast path runs on asyncssh ``version`` under ``environ``, and why not ('' if it does)."""
    setting = environ.get(ENVIRONMENT, "").strip().lower()
    if setting in ("off", "0", "no", "false"):
        return False, f"{ENVIRONMENT}={environ[ENVIRONMENT]}"
    if setting not in ("", "on", "1", "yes", "true"):
        return False, f"{ENVIRONMENT}={environ[ENVIRONMENT]!r} is not on or off"
    release = _release(version)
    low, high = TESTED
    if release is None or not low <= release < high:
        tested = f"{'.'.join(map(str, low))} to before {'.'.join(map(str, high))}"
        return False, f"asyncssh {version} is outside the tested range ({tested})"
    return True, ""


@functools.cache
def enabled() -> bool:
    """Whether this process takes the fast path (decided once; a warning says why not, unless asked)."""
    on, why = decide(asyncssh.__version__, os.environ)
    if not on:
        asked = why.startswith(f"{ENVIRONMENT}=") and "not on or off" not in why
        (log.info if asked else log.warning)("asyncssh's public path only (slower, equally guarded): %s", why)
    return on


# -- the transport under a connection ------------------------------------------------------


def coalesce(conn: asyncssh.SSHClientConnection | asyncssh.SSHServerConnection) -> CoalescingTransport | None:
    """Put a :class:`CoalescingTransport` under ``conn`` (safe at any time: nothing is pending yet).

    asyncssh offers no hook for its transport, so this replaces its private
    ``_transport`` attribute.  Off the fast path, or where that is missing, the
    connection works as asyncssh made it, and this returns None.
    """
    if not enabled():
        return None
    transport = getattr(conn, "_transport", None)
    if isinstance(transport, CoalescingTransport):
        return transport
    if not isinstance(transport, asyncio.Transport):
        log.warning("cannot coalesce SSH packets: asyncssh connection has no stream transport (%r)", type(transport))
        return None
    wrapped = CoalescingTransport(transport, asyncio.get_running_loop())
    conn._transport = wrapped  # type: ignore[assignment]  # see the docstring
    return wrapped


# -- channel data sealed in place ----------------------------------------------------------

_CHANNEL_HEAD = struct.Struct(">BBII")  # padding length, MSG_CHANNEL_DATA, recipient channel, data length
_GCM_TAG = 16


class SealingChannel(asyncssh.SSHServerChannel[Any]):
    """A server channel whose data leaves as AES-GCM packets sealed in place (see :func:`sealing_channel`).

    asyncssh's channel and packet layers copy each byte about ten times on its way to
    the socket (the channel buffer, a slice, a string, two payload joins, padding, the
    cipher's output, its split and its join with the tag).  Here each packet is laid out
    once and AES-GCM seals it into the buffer that is sent (``encrypt_into``).  The key,
    nonce, sequence number, window and rekey accounting are asyncssh's own, advanced as
    its ``send_packet`` advances them.  Anything else (another cipher, compression,
    extended data, a key exchange under way or due) takes asyncssh's path unchanged, and
    data queued for the window goes out in order either way.

    Unlike asyncssh, this sends no ``MSG_IGNORE`` before each packet: that is a defence
    for CBC ciphers, and AES-GCM seals every packet under its own nonce (OpenSSH sends
    none either).
    """

    #: Writes made, channel data bytes sent through the sealed path, and the keys they were sealed under
    #: (for tests and profiles).
    writes = 0
    sealed = 0
    keys = 0
    _aead: AESGCM | None = None
    _aead_key = b""

    def write(self, data: Any, datatype: asyncssh.DataType = None) -> None:
        self.writes += 1
        if datatype is None and not self._send_buf and not self._encoding and self._send_state == "open" and data:
            view = memoryview(data)
            if view.format == "B" and view.c_contiguous:  # counted in bytes, like the window
                sent = self._seal(view)
                if sent == view.nbytes:
                    return
                data = view[sent:]
        super().write(data, datatype)

    def _flush_send_buf(self) -> None:
        while self._send_buf and self._send_buf[0][1] is None:
            buf = self._send_buf[0][0]
            with memoryview(buf) as view:
                sent = self._seal(view)
            if not sent:
                break
            self._send_buf_len -= sent
            if sent == len(buf):
                del self._send_buf[0]
            else:
                del buf[:sent]
        super()._flush_send_buf()

    def _seal(self, data: memoryview) -> int:
        """Send as much of ``data`` as the window allows through the sealed path; bytes sent (0: not here)."""
        conn = cast(Any, self._conn)
        enc = getattr(conn, "_send_encryption", None)
        size = min(len(data), self._send_window)
        if (type(enc) is not GCMEncryption or size <= 0 or self._send_chan is None or conn._transport is None
                or conn._compressor is not None or not conn._kex_complete or conn._deferred_packets
                or conn._send_enchdrlen != 1):  # fmt: skip
            return 0
        cipher = getattr(enc, "_cipher", None)
        if type(cipher) is not GCMCipher or not isinstance(getattr(cipher, "_key", None), bytes):
            return 0
        block, pktsize = conn._send_blocksize, self._send_pktsize
        chunks = []
        total = 0
        for start in range(0, size, pktsize):
            n = min(pktsize, size - start)
            pad = -(1 + 9 + n) % block
            pad += block if pad < 4 else 0
            chunks.append((start, n, pad))
            total += 1 + 9 + n + pad
        if conn._rekey_bytes_sent + total >= conn._rekey_bytes or (
            conn._rekey_seconds and time.monotonic() >= conn._rekey_time
        ):
            return 0  # asyncssh's send_packet starts the key exchange
        if self._aead is None or self._aead_key is not cipher._key:
            self._aead, self._aead_key = AESGCM(cipher._key), cipher._key
            self.keys += 1
        out = bytearray(total + len(chunks) * (4 + _GCM_TAG))
        plain = bytearray(1 + 9 + min(pktsize, size) + 2 * block)
        pos, seq = 0, conn._send_seq
        for start, n, pad in chunks:
            length = 1 + 9 + n + pad
            _CHANNEL_HEAD.pack_into(plain, 0, pad, MSG_CHANNEL_DATA, self._send_chan, n)
            plain[10 : 10 + n] = data[start : start + n]
            plain[10 + n : length] = os.urandom(pad)
            out[pos : pos + 4] = length.to_bytes(4, "big")
            self._aead.encrypt_into(cipher._iv, memoryview(plain)[:length], out[pos : pos + 4],
                                    memoryview(out)[pos + 4 : pos + 4 + length + _GCM_TAG])  # fmt: skip
            cipher._update_iv()
            seq = (seq + 1) & 0xFFFFFFFF
            pos += 4 + length + _GCM_TAG
        conn._send_seq = seq
        conn._rekey_bytes_sent += total
        self._send_window -= size
        self.sealed += size
        conn._send(out)
        return size


#: The private asyncssh attributes the sealed path reads and advances (checked before a channel is made sealing).
_CONN_STATE = ("_send_encryption", "_transport", "_compressor", "_kex_complete", "_deferred_packets",
               "_send_enchdrlen", "_send_blocksize", "_rekey_bytes_sent", "_rekey_bytes", "_rekey_seconds",
               "_rekey_time", "_send_seq", "_send")  # fmt: skip
_CHANNEL_STATE = ("_conn", "_send_buf", "_send_buf_len", "_send_window", "_send_pktsize", "_send_chan",
                  "_send_state", "_encoding")  # fmt: skip


def sealing_channel(conn: asyncssh.SSHServerConnection) -> asyncssh.SSHServerChannel[Any]:
    """A new session channel for ``session_requested`` to return; on the fast path a :class:`SealingChannel`.

    asyncssh builds its channels itself; this takes the one it builds with the
    connection's settings and gives it the subclass's methods (the subclass adds no
    state beyond class defaults).  Off the fast path, or if the asyncssh state the
    sealed path relies on is not there, the channel stays asyncssh's own.
    """
    chan = conn.create_server_channel()
    if not enabled():
        return chan
    missing = [a for a in _CONN_STATE if not hasattr(conn, a)] + [a for a in _CHANNEL_STATE if not hasattr(chan, a)]
    missing += [] if callable(getattr(GCMCipher, "_update_iv", None)) else ["GCMCipher._update_iv"]
    missing += [] if hasattr(AESGCM, "encrypt_into") else ["cryptography's AESGCM.encrypt_into"]
    if missing:
        log.warning("cannot seal channel data in place: missing %s", ", ".join(missing))
        return chan
    chan.__class__ = SealingChannel
    return chan


# -- the SFTP server handler ---------------------------------------------------------------

_SFTP_DATA_HEAD = struct.Struct(">IBII")  # SFTP DATA reply: length, type, request id, payload length


@runtime_checkable
class ReadableFile(Protocol):
    """What :class:`SFTPHandler` needs of a handle the server returned to answer a READ in place."""

    fd: int
    bytes_read: int

    @property
    def ready(self) -> bool:
        """Whether requests on it may be served now (its open is in the audit)."""


class _Handles(Protocol):
    limit: int


class ReplyGate(Protocol):
    """Holds replies until the audit has committed the decisions they answer (``medbridge.platform.sftp.AuditGate``)."""

    def connect(self, deliver: Callable[[bytes], None], revoke: Callable[[bytes], None]) -> None: ...

    def write(self, data: bytes) -> None: ...

    def when_drained(self, then: Callable[[], None]) -> None: ...

    @property
    def full(self) -> bool:
        """Whether the session's next request must wait (:meth:`room`)."""

    async def room(self) -> None: ...


class FileServer(Protocol):
    """What :class:`SFTPHandler` needs of the platform's SFTP server beyond asyncssh's ``SFTPServer``."""

    def reply_gate(self) -> ReplyGate | None:
        """The gate this session's replies pass (None: they leave as written)."""

    async def admitted(self) -> bool:
        """Wait until the session may be served (False: the server refuses each of its requests)."""

    def abandon(self, handle: object) -> None:
        """Close a handle whose reply was refused (the client never receives it)."""

    @property
    def max_read(self) -> int: ...

    @property
    def handles(self) -> _Handles: ...

    @property
    def congested(self) -> bool:
        """Whether the channel's unsent replies are past its mark: a READ then takes the generic path, which waits."""

    def read_file(self, path: bytes, offset: int, length: int) -> bytes | Awaitable[bytes]: ...


class SFTPHandler(SFTPServerHandler):
    """asyncssh's SFTP server protocol, plus ``read-file@medbridge`` and READs answered in place.

    asyncssh has no public way to add an extension, so this extends its handler's tables;
    ``tests/test_fastpath.py`` fails if a release changes them.  Which requests reach it at
    all is decided before, on either path (``medbridge.platform.sftp.RequestFilter``).
    """

    #: The extensions named in the VERSION reply: asyncssh's, less those the platform does not serve.
    advertised: Collection[bytes] = ()

    #: The audit's gate on this session's replies (set by :func:`start_sftp`).
    gate: ReplyGate | None = None

    async def _process_packet(self, pkttype: int, pktid: int, packet: SSHPacket) -> None:
        gate = self.gate
        if gate is not None and gate.full:  # it holds too many replies already: serve nothing more until some left
            await gate.room()
        if pkttype == FXP_READ and self._read_in_place(pktid, SSHPacket(packet.get_remaining_payload())):
            return
        await super()._process_packet(pkttype, pktid, packet)

    def _read_in_place(self, pktid: int, request: SSHPacket) -> bool:
        """Answer a READ of a stored file with the bytes read straight into the reply being sent.

        asyncssh's generic path copies each byte four times (into a string, a payload, a
        packet, a frame) before its channel layer copies it again; here ``preadv`` fills
        the reply in place.  Anything else (a virtual file, the end of a file, an error, a
        malformed request) returns False and takes the generic path, which answers it.
        """
        try:
            handle = request.get_string()
            offset = request.get_uint64()
            length = request.get_uint32()
            request.check_end()
        except PacketDecodeError:
            return False
        f = self._file_handles.get(handle)
        server = cast(FileServer, self._server)
        if not isinstance(f, ReadableFile) or not f.ready or not 0 < length <= server.max_read or server.congested:
            return False
        reply = bytearray(_SFTP_DATA_HEAD.size + length)
        try:
            n = os.preadv(f.fd, [memoryview(reply)[_SFTP_DATA_HEAD.size :]], offset)
        except (OSError, OverflowError, ValueError):  # an offset past 2**63 is OverflowError, not OSError
            return False
        if n == 0:
            return False
        _SFTP_DATA_HEAD.pack_into(reply, 0, 9 + n, FXP_DATA, pktid, n)
        f.bytes_read += n
        writer = self._writer
        if writer is not None and not writer.channel.is_closing():
            data = reply if n == length else memoryview(reply)[: _SFTP_DATA_HEAD.size + n]
            writer.write(data)  # type: ignore[arg-type]
        return True

    def revoke_handle(self, handle: bytes) -> None:
        """Forget a handle the client never received (its grant could not be audited) and close it."""
        f = self._file_handles.pop(handle, None)
        if f is not None:
            cast(FileServer, self._server).abandon(f)

    async def serve(self, server: FileServer) -> None:
        """Run the session once the server has settled its admission (it refuses each request if it was refused)."""
        await server.admitted()
        await self.run()

    async def _process_limits(self, packet: SSHPacket) -> SFTPLimits:
        """The platform's limits: the longest read and the handles a connection may hold (not the descriptors)."""
        packet.check_end()
        server = cast(FileServer, self._server)
        return SFTPLimits(MAX_SFTP_PACKET_LEN, server.max_read, MAX_SFTP_WRITE_LEN, server.handles.limit)

    async def _process_read_file(self, packet: SSHPacket) -> tuple[bytes, bool]:
        path = packet.get_string()
        offset = packet.get_uint64()
        length = packet.get_uint32()
        packet.check_end()
        data = cast(FileServer, self._server).read_file(path, offset, length)
        return (await data if inspect.isawaitable(data) else data), False

    # asyncssh's own tables, extended (class attributes there too, never mutated)
    _packet_handlers: dict[int | bytes, Any] = {  # noqa: RUF012
        **SFTPServerHandler._packet_handlers,
        READ_FILE_EXTENSION: _process_read_file,
        b"limits@openssh.com": _process_limits,
    }
    _return_types = {**SFTPServerHandler._return_types, READ_FILE_EXTENSION: FXP_DATA}  # noqa: RUF012


@functools.cache
def _handler_class(served: frozenset[bytes], max_read: int) -> type[SFTPHandler]:
    """:class:`SFTPHandler` naming only the ``served`` extensions (and read-file with ``max_read``)."""
    extensions = [(name, value) for name, value in SFTPServerHandler._extensions if name in served]
    extensions.append((READ_FILE_EXTENSION, str(max_read).encode()))
    return type("SFTPHandler", (SFTPHandler,), {"_extensions": extensions})


class _CorkedWriter(PassJoiner):
    """The SFTP handler's writer: the replies of one event-loop pass go out in one channel write.

    asyncssh's handler writes each reply on its own, and the channel sends each write
    as its own packets: a 32 KiB read reply to sshfs is one full packet and one of 13
    bytes.  Joined, the replies of a pass fill whole packets (half as many to seal, send
    and decrypt; docs/benchmarks.md has what it gained behind sshfs).  Nothing waits
    beyond the current pass, and at most ``limit`` bytes are held.  ``write_eof`` and
    ``close`` send what is held first.
    """

    limit = 1 << 20

    def __init__(self, writer: asyncssh.SSHWriter[bytes], loop: asyncio.AbstractEventLoop,
                 gate: ReplyGate | None = None):  # fmt: skip
        super().__init__(writer, loop)
        self.channel = writer.channel
        self._gate = gate

    def write(self, data: bytes) -> None:
        """Through the audit's gate, if there is one (it hands each reply on in order, once it may leave)."""
        if self._gate is not None:
            self._gate.write(data)
        else:
            super().write(data)

    def pass_on(self, data: bytes) -> None:
        super().write(data)

    def write_eof(self) -> None:
        """After the replies the gate still holds."""
        if self._gate is not None:
            self._gate.when_drained(super().write_eof)
        else:
            super().write_eof()

    def close(self) -> None:
        """After the replies the gate still holds."""
        if self._gate is not None:
            self._gate.when_drained(super().close)
        else:
            super().close()

    def _deliver(self, data: bytes, writes: int) -> None:
        if not self.channel.is_closing():
            try:
                self._target.write(data)
            except OSError as exc:  # run from the loop, outside the handler: end the session, never hang it
                log.warning("SFTP replies could not be sent (%s): closing the channel", exc)
                self.channel.close()


def start_sftp(
    process: asyncssh.SSHServerProcess[bytes],
    make_server: Callable[[asyncssh.SSHServerChannel[bytes]], FileServer],
    served: frozenset[bytes],
) -> bool:
    """Serve ``process``'s sftp subsystem through :class:`SFTPHandler`; False (nothing done) off the fast path.

    Re-does asyncssh's own start of an SFTP session (its process's private channel and
    stream constructors), with the handler and writer of this module.
    """
    if not enabled():
        return False
    chan = process.channel
    chan.set_encoding(None)
    server = make_server(chan)
    cls = _handler_class(served, server.max_read)
    gate = server.reply_gate()
    writer = _CorkedWriter(asyncssh.SSHWriter(process, chan), asyncio.get_running_loop(), gate)
    handler = cls(server, asyncssh.SSHReader(process, chan), writer, 3)  # type: ignore[arg-type]
    if gate is not None:
        gate.connect(writer.pass_on, handler.revoke_handle)
        handler.gate = gate
    chan.get_connection().create_task(handler.serve(server), handler.logger)
    return True
