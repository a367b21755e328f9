"""The read-ahead cache on its own, with a fetch function that counts what it was asked."""

from __future__ import annotations

import os

import pytest

from medbridge.loader.cache import ReadAheadCache

DATA = os.urandom(10 * 1000 + 7)


def make(**kw: int) -> tuple[ReadAheadCache, list[tuple[int, int]]]:
    calls: list[tuple[int, int]] = []

    def fetch(offset: int, size: int) -> bytes:
        calls.append((offset, size))
        return DATA[offset : offset + size]

    return ReadAheadCache(fetch, len(DATA), **kw), calls


def test_reads_are_exact_across_blocks() -> None:
    cache, _ = make(block=1000, readahead=0, capacity=100_000)
    for offset, size in [(0, 10), (995, 10), (0, len(DATA)), (9_990, 100), (len(DATA), 5), (3000, 0)]:
        assert cache.read(offset, size) == DATA[offset : offset + size]


def test_read_ahead_turns_sequential_reads_into_hits() -> None:
    cache, calls = make(block=1000, readahead=3, capacity=100_000)
    for offset in range(0, 4000, 500):
        assert cache.read(offset, 500) == DATA[offset : offset + 500]
    assert len(calls) == 1 and calls[0] == (0, 4000)
    c = cache.counters
    assert (c.misses, c.hits) == (1, 7)
    assert c.bytes_requested == 4000 and c.bytes_fetched == 4000 and c.seconds_waited >= 0


def test_memory_is_bounded_and_wiped() -> None:
    cache, calls = make(block=1000, readahead=0, capacity=2000)
    cache.read(0, 10)
    cache.read(1000, 10)
    cache.read(2000, 10)
    blocks = list(cache._blocks.values())
    assert len(blocks) == 2, "only capacity/block blocks are kept"
    cache.read(0, 10)
    assert len(calls) == 4, "the oldest block was evicted and fetched again"
    cache.close()
    assert all(not any(b) for b in blocks), "blocks are zeroed on close"
    with pytest.raises(ValueError):
        cache.read(0, 1)
