"""Fewer socket writes for an SSH connection: the packets of one event-loop pass leave in one ``send``.

asyncssh writes every SSH packet to its transport on its own, and asyncio's
transport sends each write at once when its buffer is empty: one system call per
packet.  A 32 KiB SFTP read reply to sshfs is two packets, each after an
``MSG_IGNORE`` asyncssh adds, and on a VM a ``send`` costs more than sealing a small packet (docs/benchmarks.md has the
profile).  :func:`coalesce` puts a thin
layer under the connection that joins what one pass of the loop writes and sends it
once, after the pass.  Order is kept, and nothing is delayed beyond the current pass.
``close``, ``abort`` and ``write_eof`` send what is pending first, as the plain
transport would have done.

:class:`SealingChannel` cuts the copies under a channel's data: asyncssh copies
each byte about ten times between ``write`` and the socket; on an AES-GCM connection
this lays each packet out once and seals it straight into the buffer that is sent.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import struct
import time
from typing import Any, cast

import asyncssh
from asyncssh.constants import MSG_CHANNEL_DATA
from asyncssh.crypto.cipher import GCMCipher
from asyncssh.encryption import GCMEncryption
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger("medbridge.transport")


class PassJoiner(abc.ABC):
    """Holds what one event-loop pass writes to ``target`` and hands it on joined, once, after the pass.

    Order is kept; nothing waits beyond the current pass, nor past ``limit`` held bytes
    (0: no bound).  ``write_eof`` and ``close`` hand on what is held first; everything
    else passes through to ``target``.  Subclasses say how a joined write is delivered.
    """

    limit = 0

    def __init__(self, target: Any, loop: asyncio.AbstractEventLoop):
        self._target = target
        self._loop = loop
        self._parts: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        if not self._parts:
            self._loop.call_soon(self.flush)
        self._parts.append(data)
        self._size += len(data)
        if self.limit and self._size >= self.limit:
            self.flush()

    def flush(self) -> None:
        parts, self._parts, self._size = self._parts, [], 0
        if parts:
            self._deliver(parts[0] if len(parts) == 1 else b"".join(parts), len(parts))

    @abc.abstractmethod
    def _deliver(self, data: bytes, writes: int) -> None:
        """Hand on one joined write of ``writes`` parts."""

    def write_eof(self) -> None:
        self.flush()
        self._target.write_eof()

    def close(self) -> None:
        self.flush()
        self._target.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


class CoalescingTransport(PassJoiner):
    """Wraps a stream transport; everything but writing and closing passes through."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        super().__init__(transport, loop)
        #: Socket writes made and SSH packets they carried, for tests and profiles.
        self.sends = 0
        self.packets = 0

    def _deliver(self, data: bytes, writes: int) -> None:
        if not self._target.is_closing():
            self.sends += 1
            self.packets += writes
            self._target.write(data)

    def abort(self) -> None:
        self.flush()
        self._target.abort()

    def get_write_buffer_size(self) -> int:
        return int(self._target.get_write_buffer_size()) + self._size


def coalesce(conn: asyncssh.SSHClientConnection | asyncssh.SSHServerConnection) -> CoalescingTransport | None:
    """Put a :class:`CoalescingTransport` under ``conn`` (safe at any time: nothing is pending yet).

    asyncssh offers no hook for its transport, so this replaces its private
    ``_transport`` attribute.  Where that is missing (a future asyncssh), the
    connection works as before, only slower: a warning says so, and a test fails.
    """
    transport = getattr(conn, "_transport", None)
    if isinstance(transport, CoalescingTransport):
        return transport
    if not isinstance(transport, asyncio.Transport):
        log.warning("cannot coalesce SSH packets: asyncssh connection has no stream transport (%r)", type(transport))
        return None
    wrapped = CoalescingTransport(transport, asyncio.get_running_loop())
    conn._transport = wrapped  # type: ignore[assignment]  # see the docstring
    return wrapped


_DATA_HEAD = struct.Struct(">BBII")  # padding length, MSG_CHANNEL_DATA, recipient channel, data length
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
            _DATA_HEAD.pack_into(plain, 0, pad, MSG_CHANNEL_DATA, self._send_chan, n)
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
    """A new session channel for ``session_requested`` to return, sending its data through :class:`SealingChannel`.

    asyncssh builds its channels itself; this takes the one it builds with the
    connection's settings and gives it the subclass's methods (the subclass adds no
    state beyond class defaults).  If the asyncssh state the sealed path relies on is
    not there (a future release), the channel stays asyncssh's own, a warning says so,
    and a test fails.
    """
    chan = conn.create_server_channel()
    missing = [a for a in _CONN_STATE if not hasattr(conn, a)] + [a for a in _CHANNEL_STATE if not hasattr(chan, a)]
    missing += [] if callable(getattr(GCMCipher, "_update_iv", None)) else ["GCMCipher._update_iv"]
    missing += [] if hasattr(AESGCM, "encrypt_into") else ["cryptography's AESGCM.encrypt_into"]
    if missing:
        log.warning("cannot seal channel data in place: missing %s", ", ".join(missing))
        return chan
    chan.__class__ = SealingChannel
    return chan
