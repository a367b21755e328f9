"""A read-ahead block cache in memory: the fetch function is injected, counters say what it cost.

Pure of I/O itself (``fetch(offset, size) -> bytes`` does the reading), bounded in
memory (least recently used blocks go first), and wiped on close: blocks are zeroed
before they are dropped, so no image bytes linger in freed memory longer than needed.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

Fetcher = Callable[[int, int], bytes]


@dataclass
class Counters:
    hits: int = 0
    misses: int = 0
    bytes_requested: int = 0
    bytes_fetched: int = 0
    seconds_waited: float = 0.0


class ReadAheadCache:
    """Serve ``read(offset, size)`` of one object of ``length`` bytes from cached blocks."""

    def __init__(self, fetch: Fetcher, length: int, *, block: int = 1 << 20, readahead: int = 4,
                 capacity: int = 64 << 20):  # fmt: skip
        if block <= 0 or capacity < block:
            raise ValueError("block must be positive and capacity at least one block")
        self._fetch = fetch
        self.length = length
        self.block = block
        self.readahead = readahead
        self.capacity = capacity
        self._blocks: OrderedDict[int, bytearray] = OrderedDict()
        self.counters = Counters()
        self._closed = False

    def read(self, offset: int, size: int) -> bytes:
        if self._closed:
            raise ValueError("read from a closed cache")
        if offset < 0 or size < 0:
            raise ValueError("offset and size must not be negative")
        end = min(self.length, offset + size)
        if offset >= end:
            return b""
        self.counters.bytes_requested += end - offset
        first, last = offset // self.block, (end - 1) // self.block
        missing = [b for b in range(first, last + 1) if b not in self._blocks]
        if missing:
            self.counters.misses += 1
            ahead = range(last + 1, min(last + 1 + self.readahead, (self.length - 1) // self.block + 1))
            self._load(missing[0], max(missing[-1], *(list(ahead) or [missing[-1]])))
        else:
            self.counters.hits += 1
        out = bytearray()
        for b in range(first, last + 1):
            blk = self._blocks[b]
            self._blocks.move_to_end(b)
            lo = max(offset, b * self.block) - b * self.block
            hi = min(end, (b + 1) * self.block) - b * self.block
            out += blk[lo:hi]
        return bytes(out)

    def _load(self, first: int, last: int) -> None:
        """Fetch blocks first..last (one request) and keep them, evicting the oldest beyond capacity."""
        start = first * self.block
        stop = min(self.length, (last + 1) * self.block)
        t0 = time.perf_counter()
        data = self._fetch(start, stop - start)
        self.counters.seconds_waited += time.perf_counter() - t0
        self.counters.bytes_fetched += len(data)
        for b in range(first, last + 1):
            lo = b * self.block - start
            chunk = data[lo : lo + self.block]
            if chunk:
                self._blocks[b] = bytearray(chunk)
                self._blocks.move_to_end(b)
        while len(self._blocks) * self.block > self.capacity:
            _, old = self._blocks.popitem(last=False)
            old[:] = bytes(len(old))

    def close(self) -> None:
        for blk in self._blocks.values():
            blk[:] = bytes(len(blk))
        self._blocks.clear()
        self._closed = True
