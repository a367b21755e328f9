"""Lung segmentation by thresholding and connected components (numpy only), and its command-line payload."""

from __future__ import annotations

import asyncio
import json
import os
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
    """Each volume of the dataset: from the sshfs mount if there is one, else over SFTP into memory."""
    if os.environ.get("MEDBRIDGE_MOUNT"):
        for path in sorted((Path(os.environ["MEDBRIDGE_MOUNT"]) / "datasets" / dataset).glob("*.nii")):
            yield path.name, path.read_bytes()
        return
    yield from asyncio.run(_fetch_all(dataset))


async def _fetch_all(dataset: str) -> list[tuple[str, bytes]]:
    from medbridge.compute.session import connect, endpoint_from_job

    out: list[tuple[str, bytes]] = []
    async with await connect(endpoint_from_job(os.environ)) as conn:
        sftp = await conn.start_sftp_client()
        names = sorted(n for n in await sftp.listdir(f"/datasets/{dataset}") if n.endswith(".nii"))
        for name in names:
            async with sftp.open(f"/datasets/{dataset}/{name}", "rb", encoding=None) as f:
                data: bytes = await f.read()
            out.append((name, data))
    return out


def main() -> int:
    """The demo job's payload: read every volume, write a lung mask per volume to $MEDBRIDGE_DEMO_OUTPUTS."""
    outputs = Path(os.environ["MEDBRIDGE_DEMO_OUTPUTS"])
    outputs.mkdir(parents=True, exist_ok=True)
    summary: list[dict[str, Any]] = []
    read_bytes = 0
    cache = os.environ.get("MEDBRIDGE_DEMO_CACHE")
    for name, data in _volumes(os.environ.get("MEDBRIDGE_DEMO_DATASET", "chest-ct")):
        if cache and not summary:
            # What many loaders do: keep a local copy for the next epoch. The residue scan must catch it.
            Path(cache).mkdir(parents=True, exist_ok=True)
            (Path(cache) / f"cached-{name}").write_bytes(data)
        start = time.perf_counter()
        read_bytes += len(data)
        volume, spacing = nifti.decode(data)
        mask = lungs(volume)
        voxel_ml = float(np.prod(spacing)) / 1000.0
        nifti.write(outputs / name.replace(".nii", "_lungs.nii"), mask, spacing)
        summary.append(
            {"volume": name, "lung_ml": round(float(mask.sum()) * voxel_ml, 1),
             "lung_fraction": round(float(mask.mean()), 4), "seconds": round(time.perf_counter() - start, 3)}
        )  # fmt: skip
    result = {"read_bytes": read_bytes, "volumes": summary}
    (outputs / "summary.json").write_text(json.dumps(result, indent=2))
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
