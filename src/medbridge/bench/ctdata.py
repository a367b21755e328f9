"""CT volumes for the training experiments: a generated chest-CT dataset, and one way to stream any dataset's
files from local disk, the job's sshfs mount or the native loader.

A case is ``NAME.nii`` with its label ``NAME_seg.nii`` beside it (for segmentation).
``Source`` streams the bytes of a list of files in order; the training loops time how
long they wait for the next one (the load time a job feels): from local disk and the
mount one file after another, as a plain training loop reads; through the loader with
its window of reads in flight.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medbridge.demo import phantom
from medbridge.errors import InvalidInput
from medbridge.ingest import nifti

LABEL = "_seg.nii"
KINDS = ("local", "mount", "native")
HU_LOW, HU_HIGH = -1000.0, 400.0


def generate(folder: Path, cases: int, shape: tuple[int, int, int]) -> None:
    """``cases`` synthetic chest CTs with their lung masks (the demo's phantom), as NIfTI."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, cases + 1):
        volume, truth = phantom.chest_with_truth(seed=i, shape=shape)
        nifti.write(folder / f"ct-{i:03d}.nii", volume, phantom.SPACING)
        nifti.write(folder / f"ct-{i:03d}{LABEL}", truth.astype(np.uint8), phantom.SPACING)


def prepare(own: Path | None, generated: Path, cases: int, shape: tuple[int, int, int], labels: bool,
            say: Any) -> Path:  # fmt: skip
    """The folder a benchmark ingests and its local jobs read: ``own`` (checked: volumes, with labels when
    ``labels``), or ``cases`` generated chest CTs in ``generated``."""
    if own is None:
        say(f"generating {cases} chest CTs of {shape[0]}³")
        generate(generated, cases, shape)
        return generated
    if not own.is_dir():
        raise InvalidInput(f"--from {own}: not a folder")
    names = set(os.listdir(own))
    volumes = [n for n in names if n.endswith(".nii") and not n.endswith(LABEL)]
    unlabelled = [n for n in volumes if labels and label_of(n) not in names]
    if len(volumes) < 5 or unlabelled:
        why = f"{unlabelled[0]} has no {label_of(unlabelled[0])}" if unlabelled else f"{len(volumes)} volumes"
        raise InvalidInput(f"--from {own}: needs at least 5 NIfTI volumes (NAME.nii, with NAME{LABEL}): {why}")
    return own


def split(cases: Sequence[str]) -> tuple[list[str], list[str]]:
    """The original's 84/21 split (80/20 for any other count), in name order."""
    names = sorted(cases)
    train = 84 if len(names) == 105 else round(len(names) * 0.8)
    return names[:train], names[train:]


class Source:
    """Where a job reads: ``local:DIR``, ``mount:DATASET`` (the job's sshfs mount) or ``native:DATASET``."""

    def __init__(self, spec: str, environ: Any = os.environ):
        kind, _, where = spec.partition(":")
        if kind not in KINDS or not where:
            raise InvalidInput(f"--data {spec!r}: use local:DIR, mount:DATASET or native:DATASET")
        self.kind, self.where = kind, where
        self.loader: Any = None
        if kind == "local":
            self.folder: Path | None = Path(where)
        elif kind == "mount":
            if not environ.get("MEDBRIDGE_MOUNT"):
                raise InvalidInput("--data mount:…: no mount (run under 'medbridge job run --mount')")
            self.folder = Path(environ["MEDBRIDGE_MOUNT"]) / "datasets" / where
        else:
            from medbridge.loader import Loader

            self.folder = None
            self.loader = Loader(environ=environ)

    def files(self) -> list[str]:
        if self.folder is not None:
            return sorted(os.listdir(self.folder))
        return [p.rsplit("/", 1)[1] for p in self.loader.files(self.where)]

    def cases(self) -> list[str]:
        """The volumes (names without their label files)."""
        return [f for f in self.files() if f.endswith((".nii", ".nii.gz")) and not f.endswith(LABEL)]

    def stream(self, names: Sequence[str]) -> Iterator[bytes | bytearray]:
        if self.folder is None:
            yield from self.loader.read_many([f"/datasets/{self.where}/{n}" for n in names])
            return
        for name in names:
            with open(self.folder / name, "rb") as f:
                yield f.read()

    def read_result(self, path: str) -> bytes:
        """A file the user's earlier job committed (``/results/USER/JOB/...``): through the loader or the mount;
        with local data, a local path."""
        if self.loader is not None:
            return bytes(self.loader.read(path))
        if self.kind == "local":
            return Path(path).read_bytes()
        return (Path(os.environ["MEDBRIDGE_MOUNT"]) / path.lstrip("/")).read_bytes()

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()


def job_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every training payload takes: where it reads, where it writes, its name, seed and device."""
    parser.add_argument("--data", required=True, help="local:DIR, mount:DATASET or native:DATASET")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", default="job")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="auto")


def label_of(case: str) -> str:
    return case.removesuffix(".gz").removesuffix(".nii") + LABEL


def volume(data: bytes | bytearray) -> np.ndarray[Any, np.dtype[np.float32]]:
    """A CT volume scaled to 0..1 (air to dense soft tissue), as float32 (a copy: the buffer may be recycled)."""
    vol, _ = nifti.decode(bytes(data))
    out = (np.asarray(vol, dtype=np.float32) - HU_LOW) / (HU_HIGH - HU_LOW)
    clipped: np.ndarray[Any, np.dtype[np.float32]] = np.clip(out, 0.0, 1.0).astype(np.float32)
    return clipped


def mask(data: bytes | bytearray) -> np.ndarray[Any, np.dtype[np.int64]]:
    vol, _ = nifti.decode(bytes(data))
    return (np.asarray(vol) > 0).astype(np.int64)
