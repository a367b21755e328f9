"""Streaming shards the way WebDataset and Mosaic users expect: shuffled, split by rank and worker, resumable.

    stream = ShardStream.from_platform("chest-ct", shuffle_buffer=1000, seed=17)
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        for batch in DataLoader(stream, batch_size=8, num_workers=4):
            stream.seen(batch)                    # what the training loop has consumed
            ...
            torch.save({"data": stream.state_dict(), ...}, ckpt)   # resume: stream.load_state_dict(...)

Each epoch, the shards are put in an order drawn from ``(seed, epoch)``, and their
members, in that order, are dealt to the ``world_size`` ranks in turn, then within a
rank to its DataLoader workers in turn: every sample goes to exactly one stream, so each
is read once per epoch across all ranks and workers.  Each stream then passes its samples
through a shuffle buffer (WebDataset's ``shuffle(n)``: hold ``n``, emit one at random,
refill from the stream), drawn from ``(seed, epoch, rank, worker)``.  The buffer shuffles
sample *indices*, not bytes, so a stream's whole order is known before it reads: the
loader keeps its window of reads in flight in that order, and a resumed stream skips the
samples it already gave without reading them.  The rank and the world size come from
``torch.distributed`` when it is initialised, else from ``RANK``/``WORLD_SIZE`` (set by
``torchrun``), else 0 and 1.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import groupby
from typing import Any

import torch.distributed as dist
import torch.utils.data as tud

from medbridge.errors import InvalidInput
from medbridge.loader.client import Loader, Sample

Decode = Callable[[bytearray], Any]
Transform = Callable[[dict[str, Any]], Any]
STATE_FORMAT = "medbridge-stream/1"


def _identity(data: bytearray) -> Any:
    return data


def shuffle_buffer(items: Sequence[int], size: int, rng: random.Random) -> list[int]:
    """``items`` in the order a shuffle buffer of ``size`` gives them (size <= 1: unchanged)."""
    if size <= 1:
        return list(items)
    out: list[int] = []
    buffer: list[int] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        out.append(buffer[j])
        buffer[j] = item
    rng.shuffle(buffer)
    return out + buffer


def distributed() -> tuple[int, int]:
    """This process's rank and the world size."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class ShardStream(tud.IterableDataset[Any]):
    """An iterable dataset over samples grouped in shards; see the module's docstring."""

    def __init__(
        self,
        samples: Sequence[str | Sample],
        loader: Loader | None = None,
        *,
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        window: int = 64,
        decode: Decode = _identity,
        transform: Transform | None = None,
        key: str = "image",
    ):
        self.samples = [s if isinstance(s, Sample) else Sample(s) for s in samples]
        self.loader = loader or Loader()
        found_rank, found_world = distributed()
        self.rank = found_rank if rank is None else rank
        self.world_size = found_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise InvalidInput(f"rank {self.rank} is not in a world of {self.world_size}")
        if shuffle_buffer < 0:
            raise InvalidInput("shuffle_buffer must not be negative")
        self.buffer, self.shuffle_shards, self.seed = shuffle_buffer, shuffle_shards, seed
        self.window, self.decode, self.transform, self.key = window, decode, transform, key
        self.epoch = 0
        self._workers: int | None = None  # fixed by the first iteration or a loaded state
        self._yielded: dict[int, int] = {}  # worker -> samples consumed this epoch

    @classmethod
    def from_platform(cls, dataset: str, *, loader: Loader | None = None, **kw: Any) -> ShardStream:
        """Every member of a packed dataset's shards (``medbridge dataset pack``)."""
        loader = loader or Loader()
        samples = loader.shard_samples(dataset)
        if not samples:
            raise InvalidInput(f"dataset {dataset!r} has no shards; pack it first (medbridge dataset pack)")
        return cls(samples, loader, **kw)

    # -- what each stream reads ------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``: a new order, nothing consumed yet."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._yielded = {}

    def _rank_indices(self) -> list[int]:
        groups = [list(g) for _, g in groupby(range(len(self.samples)), key=lambda i: self.samples[i].shard or i)]
        if self.shuffle_shards:
            random.Random(f"{self.seed}/{self.epoch}/shards").shuffle(groups)
        order = [i for g in groups for i in g]
        return order[self.rank :: self.world_size]

    def order(self, worker: int, workers: int) -> list[int]:
        """Sample indices stream ``worker`` of ``workers`` gives this epoch, in order (before any resume)."""
        mine = self._rank_indices()[worker::workers]
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")
        return shuffle_buffer(mine, self.buffer, rng)

    def __len__(self) -> int:
        return len(self._rank_indices())

    def __iter__(self) -> Iterator[Any]:
        info = tud.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        self._check_workers(workers)
        todo = self.order(worker, workers)[self._yielded.get(worker, 0) :]
        samples = [self.samples[i] for i in todo]
        done = self._yielded.get(worker, 0)
        for n, (sample, data) in enumerate(zip(samples, self.loader.read_many(samples, self.window), strict=True)):
            item = {self.key: self.decode(data), "path": sample.path, "__stream__": worker, "__index__": done + n}
            yield self.transform(item) if self.transform else item

    def _check_workers(self, workers: int) -> None:
        if self._workers is None:
            self._workers = workers
        elif self._workers != workers:
            raise InvalidInput(f"this stream's state is for {self._workers} DataLoader worker(s), not {workers}: "
                               "resume with the same number, or start the epoch again")  # fmt: skip

    # -- resuming ------------------------------------------------------------------------------

    def seen(self, batch: Any) -> None:
        """Record what the loop consumed (an item or a collated batch), for :meth:`state_dict`.

        Only the loop knows: a DataLoader reads ahead of it, and its workers are other processes.
        """
        streams, indices = batch["__stream__"], batch["__index__"]
        pairs = zip(_ints(streams), _ints(indices), strict=True)
        for stream, index in pairs:
            self._yielded[stream] = max(self._yielded.get(stream, 0), index + 1)

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "epoch": self.epoch, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "workers": self._workers, "samples": len(self.samples),
                "shuffle_buffer": self.buffer, "yielded": dict(self._yielded)}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue where :meth:`state_dict` was taken: the same epoch, the samples already consumed skipped."""
        if state.get("format") != STATE_FORMAT:
            raise InvalidInput(f"not a {STATE_FORMAT} state")
        mine = {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "samples": len(self.samples),
                "shuffle_buffer": self.buffer}  # fmt: skip
        differ = [f"{k} {state.get(k)!r} (now {v!r})" for k, v in mine.items() if state.get(k) != v]
        if differ:
            raise InvalidInput(f"the saved stream state does not fit this stream: {', '.join(differ)}")
        self.epoch = int(state["epoch"])
        self._workers = state["workers"]
        self._yielded = {int(k): int(v) for k, v in state["yielded"].items()}


def _ints(value: Any) -> list[int]:
    if hasattr(value, "tolist"):
        value = value.tolist()
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]
