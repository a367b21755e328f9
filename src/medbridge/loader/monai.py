"""MONAI over the platform: a ``LoadImage(d)`` reader for NIfTI and DICOM, and a guard on MONAI's disk caches.

    from monai.transforms import LoadImaged
    from medbridge.loader.monai import MedbridgeReader
    LoadImaged(keys=["image", "label"], reader=MedbridgeReader())   # paths: medbridge://datasets/…

The reader fetches each file through the native loader (verified against the dataset's
manifest) and hands MONAI's own readers the decoded objects, so the arrays and metadata
are exactly what ``NibabelReader`` and ``PydicomReader`` give for a local file.  A path
ending in ``/`` (or naming a folder) is a DICOM series: every file in it, read in one
pipelined pass.  This is the one module that knows how MONAI's readers keep their state
between ``read`` and ``get_data`` (``filenames``, ``has_series``); on a MONAI version it
was not tested with it takes the public path instead: each file is copied into the job's
scratch folder, read by the stock reader, and removed.

Importing this module also guards MONAI's disk caches: inside ``medbridge job run``,
``PersistentDataset`` (and its subclasses ``LMDBDataset``, ``CacheNTransDataset``,
``GDSDataset``) is refused unless its ``cache_dir`` lies in the job's scratch
(``$MEDBRIDGE_SCRATCH``, wiped at teardown): a cache elsewhere would leave transformed
medical images on the node, in files the residue scan cannot recognise.
"""

from __future__ import annotations

import functools
import gzip
import inspect
import io
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import monai
import nibabel as nib
import pydicom
from monai.data.dataset import PersistentDataset
from monai.data.image_reader import ImageReader, NibabelReader, PydicomReader

from medbridge.errors import InvalidInput
from medbridge.loader.client import Loader
from medbridge.loader.filesystem import SCRATCH_ENV, platform_path

#: MONAI versions whose readers' state this module was tested against (the in-memory path).
TESTED = re.compile(r"1\.[3-6]\.")
NIFTI = (".nii", ".nii.gz")
DICOM = (".dcm", ".dicom", "/")


class MedbridgeReader(ImageReader):
    """Reads ``medbridge://`` (or ``/datasets/…``) paths for ``LoadImage``: NIfTI by nibabel, DICOM by pydicom."""

    def __init__(self, loader: Loader | None = None, *, in_memory: bool | None = None, **kwargs: Any):
        super().__init__()
        self.loader = loader or Loader()
        self.in_memory = TESTED.match(monai.__version__) is not None if in_memory is None else in_memory
        self.nifti = NibabelReader(**{k: v for k, v in kwargs.items() if k != "fname_regex"})
        self.dicom = PydicomReader(**kwargs)
        self._used: ImageReader | None = None
        self._scratch: list[Path] = []

    def verify_suffix(self, filename: Sequence[Any] | Any) -> bool:
        names = [str(f) for f in (filename if isinstance(filename, (list, tuple)) else [filename])]
        return all(_platform(n) is not None and _kind(n) is not None for n in names)

    def read(self, data: Sequence[Any] | Any, **kwargs: Any) -> Any:
        names = [str(f) for f in (data if isinstance(data, (list, tuple)) else [data])]
        paths = [_platform(n) or n for n in names]
        kinds = {_kind(p) or self._kind_of_folder(p) for p in paths}
        if len(kinds) != 1:
            raise InvalidInput(f"MedbridgeReader reads NIfTI or DICOM, one kind per item: {names}")
        self._used = self.nifti if kinds == {"nifti"} else self.dicom
        self._wipe()
        if not self.in_memory:
            return self._used.read([self._to_scratch(p) for p in paths], **kwargs)
        images: list[Any] = []
        files: list[Any] = []
        series = False
        for path in paths:
            if self._used is self.nifti:
                images.append(_nifti(path, self.loader.read(path)))
                files.append(path)
            elif _is_folder(path, self.loader):
                slices = self._series(path)
                series = series or len(slices) > 1
                images.append([ds for _, ds in slices] if len(slices) > 1 else slices[0][1])
                files.append([p for p, _ in slices] if len(slices) > 1 else slices[0][0])
            else:
                images.append(pydicom.dcmread(io.BytesIO(self.loader.read(path)), **{**self.dicom.kwargs, **kwargs}))
                files.append(path)
        self._used.filenames = files
        if self._used is self.dicom:
            self.dicom.has_series = series
        return images[0] if len(images) == 1 else images

    def get_data(self, img: Any) -> tuple[Any, dict[str, Any]]:
        if self._used is None:
            raise RuntimeError("get_data before read")
        try:
            out: tuple[Any, dict[str, Any]] = self._used.get_data(img)
        finally:
            self._wipe()
        return out

    def _kind_of_folder(self, path: str) -> str | None:
        return "dicom" if _is_folder(path, self.loader) else None

    def _series(self, folder: str) -> list[tuple[str, Any]]:
        names = sorted(
            f"{folder.rstrip('/')}/{n}" for n, a in self.loader.scandir(folder) if not _is_dir(a.permissions)
        )
        out = []
        for name, raw in zip(names, self.loader.read_many(names), strict=True):
            try:
                out.append((name, pydicom.dcmread(io.BytesIO(raw), **self.dicom.kwargs)))
            except pydicom.errors.InvalidDicomError:
                continue  # not a slice (a README, a label file): PydicomReader skips these too
        if not out:
            raise FileNotFoundError(f"{folder}: no DICOM files in this folder")
        return out

    def _to_scratch(self, path: str) -> str:
        """The public path: a copy in the job's scratch (teardown wipes it; this reader removes it after use)."""
        scratch = os.environ.get(SCRATCH_ENV)
        if not scratch:
            raise PermissionError(f"MONAI {monai.__version__} is not one this reader was tested with; the way round "
                                  f"it needs the job's scratch folder (${SCRATCH_ENV}), which is not set")  # fmt: skip
        folder = Path(tempfile.mkdtemp(prefix="monai-", dir=scratch))
        self._scratch.append(folder)
        if _is_folder(path, self.loader):
            names = sorted(n for n, a in self.loader.scandir(path) if not _is_dir(a.permissions))
            full = [f"{path.rstrip('/')}/{n}" for n in names]
            for name, raw in zip(names, self.loader.read_many(full), strict=True):
                (folder / name).write_bytes(raw)
            return str(folder)
        target = folder / path.rsplit("/", 1)[-1]
        target.write_bytes(self.loader.read(path))
        return str(target)

    def _wipe(self) -> None:
        for folder in self._scratch:
            shutil.rmtree(folder, ignore_errors=True)
        self._scratch.clear()


def _platform(name: str) -> str | None:
    """The platform path a LoadImage name stands for (``Path()`` folds ``medbridge://`` to ``medbridge:/``)."""
    if name.startswith("medbridge:") or name.startswith("/datasets/"):
        folder = name.endswith("/")
        path = platform_path(name)
        return path + "/" if folder else path
    return None


def _kind(path: str) -> str | None:
    low = path.lower()
    if low.endswith(NIFTI):
        return "nifti"
    if low.endswith(DICOM):
        return "dicom"
    return None


def _is_dir(mode: int | None) -> bool:
    return mode is not None and (mode & 0o170000) == 0o040000


def _is_folder(path: str, loader: Loader) -> bool:
    return path.endswith("/") or (_kind(path) is None and _is_dir(loader.stat(path).permissions))


def _nifti(path: str, raw: bytearray) -> Any:
    data = gzip.decompress(raw) if path.lower().endswith(".gz") else bytes(raw)
    try:
        return nib.Nifti1Image.from_bytes(data)
    except (ValueError, EOFError, nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError) as exc:
        raise InvalidInput(f"{path}: not a NIfTI-1 image ({exc})") from exc


# -- the disk-cache guard --------------------------------------------------------------------


def _guard(init: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(init)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> None:
        check_cache_dir(type(self).__name__, _cache_dir(init, self, args, kwargs))
        init(self, *args, **kwargs)

    guarded.__medbridge_guard__ = True  # type: ignore[attr-defined]
    return guarded


def _cache_dir(init: Callable[..., None], self: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    bound = inspect.signature(init).bind_partial(self, *args, **kwargs)
    return bound.arguments.get("cache_dir")


def check_cache_dir(kind: str, cache_dir: Any, environ: Any = None) -> None:
    """Refuse a disk cache outside the job's scratch (inside ``medbridge job run`` only)."""
    env = os.environ if environ is None else environ
    scratch = env.get(SCRATCH_ENV)
    if scratch is None or cache_dir is None:
        return
    where = Path(os.path.realpath(cache_dir))
    if not where.is_relative_to(Path(os.path.realpath(scratch))):
        raise PermissionError(
            f"{kind}(cache_dir={str(cache_dir)!r}) would leave transformed medical images on this node; inside "
            f"'medbridge job run' put MONAI's disk caches under ${SCRATCH_ENV} ({scratch}, wiped at teardown), "
            "or use CacheDataset (memory)"
        )


def guard_disk_caches() -> None:
    """Wrap ``PersistentDataset.__init__`` (its subclasses call it) with :func:`check_cache_dir`; idempotent."""
    init = PersistentDataset.__init__
    if not getattr(init, "__medbridge_guard__", False):
        PersistentDataset.__init__ = _guard(init)  # type: ignore[method-assign]


def scratch_cache(name: str) -> str:
    """A folder for a MONAI disk cache in the job's scratch (created), e.g. ``PersistentDataset(cache_dir=…)``."""
    scratch = os.environ.get(SCRATCH_ENV)
    if not scratch:
        raise PermissionError(f"no job scratch (${SCRATCH_ENV}): disk caches of platform data exist only in a job")
    folder = Path(scratch) / name
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return str(folder)


guard_disk_caches()
