"""The ``webdataset`` library on medbridge shards: ``medbridge://`` URLs for its ``gopen``, each shard verified.

    import webdataset as wds
    from medbridge.loader.wds import shard_urls
    for sample in wds.WebDataset(shard_urls("chest-ct"), shardshuffle=False):
        sample["__key__"], sample["nii"]          # one tar member per sample, keyed by its path

medbridge shards are plain tar files, so WebDataset reads them as they are: a member
``case-001/image.nii`` is the sample ``case-001/image`` with the field ``nii``.  Files
named ``<key>.<field>.<ext>`` (``case-001.image.nii``, ``case-001.label.nii.gz``), packed
together, become one sample with several fields, WebDataset's own layout.  Importing this
module registers the ``medbridge`` scheme with WebDataset's ``gopen``; each shard is
streamed through the loader with a large read-ahead and checked, once read whole,
against the SHA-256 in its index (a changed shard is an ``IntegrityError``).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any

import webdataset

from medbridge.errors import IntegrityError
from medbridge.loader.client import Loader
from medbridge.loader.filesystem import MedbridgeFileSystem, platform_path

READ_AHEAD = 8 << 20
_given: list[Loader] = []  # the loader last passed to shard_urls: gopen has no way to be given one


def shard_urls(dataset: str, loader: Loader | None = None) -> list[str]:
    """The ``medbridge://`` URL of every shard of ``dataset``, in order (``loader``: used to open them too)."""
    if loader is not None:
        _given[:] = [loader]
    fs = _fs(loader)
    index = sorted(p for p in fs.find(f"/datasets/{dataset}/.shards") if p.endswith(".tar"))
    return [fs.unstrip_protocol(p) for p in index]


class VerifiedShard:
    """A shard read front to back; when its last byte has been read, its SHA-256 must match the index's."""

    def __init__(self, raw: Any, size: int, sha256: str, name: str):
        self.raw, self.size, self.expected, self.name = raw, size, sha256, name
        self.digest = hashlib.sha256()
        self.pos = 0
        self.sequential = True

    def read(self, n: int = -1) -> bytes:
        if self.raw.tell() != self.pos:
            self.sequential = False
        data: bytes = self.raw.read(n)
        self.pos = self.raw.tell()
        if self.sequential:
            self.digest.update(data)
            if self.pos == self.size and data:
                self._check()
        return data

    def _check(self) -> None:
        if self.digest.hexdigest() != self.expected:
            raise IntegrityError(f"{self.name}: shard does not match its index (changed on the platform)")

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> VerifiedShard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> VerifiedShard:
    """WebDataset's ``gopen`` handler for ``medbridge://`` (read only)."""
    if mode != "rb":
        raise ValueError(f"{url}: medbridge:// shards are read-only")
    fs = _fs(_given[0] if _given else None)
    path = platform_path(url)
    index = json.loads(fs.loader.read(path + ".index.json"))
    if posixpath.basename(path) != index.get("shard"):
        raise IntegrityError(f"{url}: its index names another shard")
    raw = fs.open(path, "rb", block_size=READ_AHEAD)
    return VerifiedShard(raw, int(index["size"]), str(index["sha256"]), path)


def _fs(loader: Loader | None) -> MedbridgeFileSystem:
    return MedbridgeFileSystem(loader) if loader is not None else MedbridgeFileSystem()


webdataset.gopen_schemes["medbridge"] = gopen
