"""Lung segmentation by thresholding and connected components (numpy only), and its command-line payload."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medbridge.ingest import nifti

LUNG_MAX_HU = -400


def _neighbours_min(labels: npt.NDArray[np.int64], mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
    out = labels.copy()
    big = np.iinfo(np.int64).max
    for axis in range(3):
        for step in (1, -1):
            shifted = np.roll(labels, step, axis=axis)
            edge = [slice(None)] * 3
            edge[axis] = slice(0, 1) if step == 1 else slice(-1, None)
            shifted[tuple(edge)] = big
            np.minimum(out, shifted, out=out, where=mask)
    return out


def components(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
    """6-connected component labels (0 = background), by propagating the smallest index."""
    big = np.iinfo(np.int64).max
    labels = np.where(mask, np.arange(mask.size, dtype=np.int64).reshape(mask.shape) + 1, big)
    while True:
        nxt = _neighbours_min(labels, mask)
        if np.array_equal(nxt, labels):
            break
        labels = nxt
    labels[~mask] = 0
    return labels


def lungs(volume: npt.NDArray[np.generic]) -> npt.NDArray[np.uint8]:
    """Air-like voxels not connected to the outside, keeping the two largest components."""
    air = np.asarray(volume) < LUNG_MAX_HU
    labels = components(air)
    border = np.unique(
        np.concatenate(
            [
                labels[0].ravel(),
                labels[-1].ravel(),
                labels[:, 0].ravel(),
                labels[:, -1].ravel(),
                labels[:, :, 0].ravel(),
                labels[:, :, -1].ravel(),
            ]
        )
    )
    inside = air & ~np.isin(labels, border)
    ids, counts = np.unique(labels[inside], return_counts=True)
    keep = ids[np.argsort(counts)[::-1][:2]]
    return np.isin(labels, keep).astype(np.uint8)


def _volumes(dataset: str) -> Iterator[tuple[str, bytes]]:
    """Each volume of the dataset, read as the job goes: from the sshfs mount if there is one, else by the loader
    (one volume read ahead, as an inference loop would)."""
    if os.environ.get("MEDBRIDGE_MOUNT"):
        for path in sorted((Path(os.environ["MEDBRIDGE_MOUNT"]) / "datasets" / dataset).glob("*.nii")):
            yield path.name, path.read_bytes()
        return
    from medbridge.loader import Loader

    with Loader() as loader:
        names = [p for p in loader.files(dataset) if p.endswith(".nii")]
        for name, data in zip(names, loader.read_many(names, window=2), strict=True):
            yield posixpath.basename(name), bytes(data)


def segment_one(name: str, data: bytes, outputs: Path) -> dict[str, Any]:
    """One volume's lung mask, written to ``outputs`` as ``<name>_lungs.nii``; what it found."""
    start = time.perf_counter()
    volume, spacing = nifti.decode(data)
    mask = lungs(volume)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    nifti.write(outputs / mask_name(name), mask, spacing)
    seconds = round(time.perf_counter() - start, 3)
    return {"volume": name, "lung_ml": round(float(mask.sum()) * voxel_ml, 1),
            "lung_fraction": round(float(mask.mean()), 4), "seconds": seconds}  # fmt: skip


def mask_name(volume: str) -> str:
    return volume.replace(".nii", "_lungs.nii")


def main() -> int:
    """The demo job's payload: read every volume, write a lung mask per volume to $MEDBRIDGE_DEMO_OUTPUTS.

    With $MEDBRIDGE_DEMO_TIMINGS, each read's start and end (seconds since the epoch) and the SHA-256 of the bytes it
    got go there as JSON lines, and
    the start of the read under way to a file beside it (``.asking``), so a read that never returns is seen too.
    """
    outputs = Path(os.environ["MEDBRIDGE_DEMO_OUTPUTS"])
    outputs.mkdir(parents=True, exist_ok=True)
    summary: list[dict[str, Any]] = []
    read_bytes = 0
    cache = os.environ.get("MEDBRIDGE_DEMO_CACHE")
    timings = os.environ.get("MEDBRIDGE_DEMO_TIMINGS")
    log = open(timings, "a", buffering=1) if timings else None  # noqa: SIM115 - one line per read, closed below
    volumes = _volumes(os.environ.get("MEDBRIDGE_DEMO_DATASET", "chest-ct"))
    try:
        while True:
            asked = time.time()
            if timings:  # a read that never returns still says when it was asked (bench outage's stall)
                Path(timings).with_suffix(".asking").write_text(f"{asked}")
            item = next(volumes, None)
            if item is None:
                break
            name, data = item
            if log is not None:
                log.write(json.dumps({"volume": name, "asked": asked, "got": time.time(), "bytes": len(data),
                                      "sha256": hashlib.sha256(data).hexdigest()}) + "\n")  # fmt: skip
            if cache and not summary:
                # What many loaders do: keep a local copy for the next epoch. The residue scan must catch it.
                Path(cache).mkdir(parents=True, exist_ok=True)
                (Path(cache) / f"cached-{name}").write_bytes(data)
            read_bytes += len(data)
            summary.append(segment_one(name, data, outputs))
    finally:
        if log is not None:
            log.close()
    result = {"read_bytes": read_bytes, "volumes": summary}
    (outputs / "summary.json").write_text(json.dumps(result, indent=2))
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
