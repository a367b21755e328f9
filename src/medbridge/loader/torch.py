"""PyTorch datasets over the native loader (torch is an optional extra: ``pip install medbridge[torch]``).

Both work with ``DataLoader(num_workers>0)``: the loader is pickled into each worker
without its event loop or connections, and every worker opens its own on first use
(sharing an event loop across fork is a known hang in async filesystem libraries).
Items are dictionaries (``{"image": …, "path": …}``), so MONAI dictionary transforms
apply as they are.  The loader's errors pass through unchanged (from a worker, DataLoader
raises the same type): a revoked grant ends the epoch with :class:`AccessRevoked`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch.utils.data as tud

from medbridge.loader.client import Loader, Sample

Decode = Callable[[bytearray], Any]
Transform = Callable[[dict[str, Any]], Any]


def _identity(data: bytearray) -> Any:
    return data


class _Samples:
    """What both datasets share: the samples, the loader, and how an item is built from bytes."""

    def __init__(self, samples: Sequence[str | Sample], loader: Loader | None, decode: Decode,
                 transform: Transform | None, key: str):  # fmt: skip
        self.samples = [s if isinstance(s, Sample) else Sample(s) for s in samples]
        self.loader = loader or Loader()
        self.decode = decode
        self.transform = transform
        self.key = key

    def __len__(self) -> int:
        return len(self.samples)

    def _item(self, sample: Sample, data: bytearray) -> Any:
        item = {self.key: self.decode(data), "path": sample.path}
        return self.transform(item) if self.transform else item


class MedbridgeDataset(_Samples, tud.Dataset[Any]):
    """Map-style: item ``i`` is sample ``i`` read, decoded and transformed."""

    def __init__(self, samples: Sequence[str | Sample], loader: Loader | None = None, *,
                 decode: Decode = _identity, transform: Transform | None = None, key: str = "image"):  # fmt: skip
        super().__init__(samples, loader, decode, transform, key)

    @classmethod
    def from_platform(cls, dataset: str, *, shards: bool = False, loader: Loader | None = None,
                      **kw: Any) -> MedbridgeDataset:  # fmt: skip
        """Every file of a granted dataset (or every member of its shards)."""
        loader = loader or Loader()
        samples: Sequence[str | Sample] = loader.shard_samples(dataset) if shards else loader.files(dataset)
        return cls(samples, loader, **kw)

    def __getitem__(self, index: int) -> Any:
        sample = self.samples[index]
        return self._item(sample, self.loader.read_sample(sample))


class MedbridgeIterableDataset(_Samples, tud.IterableDataset[Any]):
    """Streams samples in the given order with a bounded window of reads in flight ahead of it.

    With several DataLoader workers, worker ``k`` of ``n`` takes every ``n``-th sample
    from ``k``: each sample is read exactly once per epoch.
    """

    def __init__(self, samples: Sequence[str | Sample], loader: Loader | None = None, *, window: int = 64,
                 decode: Decode = _identity, transform: Transform | None = None, key: str = "image"):  # fmt: skip
        super().__init__(samples, loader, decode, transform, key)
        self.window = window

    def __iter__(self) -> Iterator[Any]:
        info = tud.get_worker_info()
        mine = self.samples if info is None else self.samples[info.id :: info.num_workers]
        for sample, data in zip(mine, self.loader.read_many(mine, self.window), strict=True):
            yield self._item(sample, data)
