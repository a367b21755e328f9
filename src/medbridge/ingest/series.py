"""Volumes from DICOM series: slices grouped by series, ordered in space, rescaled, spacing kept.

Slices are ordered by their position along the slice normal (``ImagePositionPatient`` ·
rows × columns of ``ImageOrientationPatient``), or by ``InstanceNumber`` when positions
are missing.  A series that is not one regular volume (missing pixels, slices of
different shapes or orientations, two slices in one place, uneven gaps, multi-frame or
colour images) is refused with the reason.  Headers are read first, pixels one slice at
a time after, so memory holds the volume and one slice.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from medbridge.errors import AlreadyExists, InvalidInput
from medbridge.ingest import media, nifti

#: Values larger than this (pixel data, above all) are not read while sorting headers.
DEFER = 4096
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
_INT16 = np.iinfo(np.int16)


@dataclass(frozen=True, eq=False)
class Volume:
    """One series as a 3-D array indexed ``[slice, row, column]``.

    ``spacing`` is in the same order, in mm (1.0 where the files do not say).
    ``origin`` (the first slice's ``ImagePositionPatient``), ``orientation`` and
    ``slice_step`` (from one slice's position to the next) are in DICOM patient
    coordinates (LPS); they are None when the slices carry no positions.
    """

    series_uid: str
    voxels: npt.NDArray[Any]
    spacing: tuple[float, float, float]
    files: tuple[str, ...]
    modality: str = ""
    origin: tuple[float, float, float] | None = None
    orientation: tuple[float, float, float, float, float, float] | None = None
    slice_step: tuple[float, float, float] | None = None

    def affine(self) -> npt.NDArray[np.float64] | None:
        """Voxel ``(column, row, slice)`` to RAS mm, as NIfTI wants it; None without positions."""
        if self.origin is None or self.orientation is None or self.slice_step is None:
            return None
        row_dir = np.array(self.orientation[:3])
        col_dir = np.array(self.orientation[3:])
        lps = np.eye(4)
        lps[:3, 0] = row_dir * self.spacing[2]
        lps[:3, 1] = col_dir * self.spacing[1]
        lps[:3, 2] = self.slice_step
        lps[:3, 3] = self.origin
        result: npt.NDArray[np.float64] = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
        return result

    def metadata(self) -> dict[str, Any]:
        """Everything but the voxels, for a JSON sidecar."""
        affine = self.affine()
        return {
            "series_uid": self.series_uid,
            "modality": self.modality,
            "shape": list(self.voxels.shape),
            "dtype": str(self.voxels.dtype),
            "spacing": list(self.spacing),
            "origin": None if self.origin is None else list(self.origin),
            "orientation": None if self.orientation is None else list(self.orientation),
            "affine_ras": None if affine is None else affine.tolist(),
            "files": list(self.files),
        }


@dataclass(frozen=True)
class _Slice:
    path: Path
    name: str
    ds: Dataset


def find_series(root: Path) -> dict[str, list[Path]]:
    """DICOM files under ``root`` by ``SeriesInstanceUID``; other files are skipped, links refused."""
    root = Path(root)
    if not root.is_dir() or root.is_symlink():
        raise InvalidInput(f"{root}: not a directory")
    series: dict[str, list[Path]] = {}
    problems = []
    for path in _files(root):
        try:
            with open(path, "rb") as f:
                head = f.read(media.HEAD)
        except OSError as exc:
            problems.append(f"{path.relative_to(root)}: cannot read ({exc.strerror})")
            continue
        if media.media_type(head, path.name) != media.DICOM:
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=head[128:132] != b"DICM")
        except (InvalidDicomError, EOFError, OSError, ValueError) as exc:
            problems.append(f"{path.relative_to(root)}: not readable as DICOM ({type(exc).__name__})")
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            problems.append(f"{path.relative_to(root)}: no SeriesInstanceUID")
            continue
        series.setdefault(uid, []).append(path)
    if problems:
        raise InvalidInput("cannot group DICOM files into series:\n  " + "\n  ".join(problems))
    return series


def build_volumes(root: Path) -> list[Volume]:
    """One volume per series under ``root``, by series UID; if any series is refused, all reasons are raised."""
    root = Path(root)
    volumes = []
    problems = []
    for _, paths in sorted(find_series(root).items()):
        try:
            volumes.append(build_volume(paths, root=root))
        except InvalidInput as exc:
            problems.append(str(exc))
    if problems:
        raise InvalidInput("cannot build volumes:\n  " + "\n  ".join(problems))
    return volumes


def build_volume(paths: Sequence[Path], *, root: Path | None = None) -> Volume:
    """The volume of one series' slice files; ``root`` only shortens the names in ``files`` and errors."""
    if not paths:
        raise InvalidInput("a series needs at least one file")
    slices = [_Slice(Path(p), _name(Path(p), root), _header(Path(p), root)) for p in paths]
    uid = str(slices[0].ds.get("SeriesInstanceUID", "") or "")
    where = f"series {uid or '(no SeriesInstanceUID)'}"
    uids = {str(s.ds.get("SeriesInstanceUID", "") or "") for s in slices}
    if len(uids) > 1:
        raise InvalidInput(f"{where}: files from {len(uids)} series given as one")
    for s in slices:
        _check_slice(s, where)
    shapes = {(int(_number(s, "Rows", 0, where) or 0), int(_number(s, "Columns", 0, where) or 0)) for s in slices}
    if len(shapes) > 1:
        found = ", ".join(f"{r}×{c}" for r, c in sorted(shapes))
        raise InvalidInput(f"{where}: slices have different shapes ({found})")
    rows, columns = shapes.pop()
    ordered, slice_spacing, geometry = _order(slices, where)
    pixel_spacing = _pixel_spacing(ordered, where)
    voxels = _stack(ordered, (rows, columns), where)
    origin, orientation, step = geometry if geometry else (None, None, None)
    return Volume(
        series_uid=uid,
        voxels=voxels,
        spacing=(slice_spacing, *pixel_spacing),
        files=tuple(s.name for s in ordered),
        modality=str(slices[0].ds.get("Modality", "") or ""),
        origin=origin,
        orientation=orientation,
        slice_step=step,
    )


def write_volume(volume: Volume, dest: Path, fmt: Literal["nifti", "npy"]) -> Path:
    """Write ``volume`` to ``dest`` (NIfTI-1, gzipped if the name ends ``.gz``, or a NumPy ``.npy``).

    The file appears whole or not at all; an existing one is not overwritten.  ``.npy``
    holds only the voxels: keep ``volume.metadata()`` next to it for the spacing.
    """
    dest = Path(dest)
    if fmt == "nifti":
        data = nifti.encode(volume.voxels, volume.spacing, volume.affine())
        if dest.name.endswith(".gz"):
            data = gzip.compress(data, mtime=0)
    elif fmt == "npy":
        data = _npy(volume.voxels)
    else:
        raise InvalidInput(f"volume format must be 'nifti' or 'npy', not {fmt!r}")
    if os.path.lexists(dest):
        raise AlreadyExists(f"{dest} already exists")
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "xb") as out:
            out.write(data)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _files(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in dirnames + filenames:
            if (base / name).is_symlink():
                raise InvalidInput(f"{base / name}: symbolic links are not followed")
        dirnames.sort()
        for name in sorted(filenames):
            if stat.S_ISREG((base / name).lstat().st_mode):
                found.append(base / name)
    return found


def _name(path: Path, root: Path | None) -> str:
    return path.relative_to(root).as_posix() if root is not None else str(path)


def _header(path: Path, root: Path | None) -> Dataset:
    try:
        return pydicom.dcmread(path, defer_size=DEFER, force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError) as exc:
        raise InvalidInput(f"{_name(path, root)}: not readable as DICOM ({type(exc).__name__})") from exc


def _check_slice(s: _Slice, where: str) -> None:
    ds = s.ds
    if not any(t in ds for t in _PIXEL_TAGS):
        raise InvalidInput(f"{where}: {s.name} has no pixel data")
    if _number(s, "Rows", None, where) is None or _number(s, "Columns", None, where) is None:
        raise InvalidInput(f"{where}: {s.name} has no Rows or Columns")
    frames = int(_number(s, "NumberOfFrames", 1, where) or 1)
    if frames != 1:
        raise InvalidInput(f"{where}: {s.name} is multi-frame ({frames} frames), which is not supported")
    samples = int(_number(s, "SamplesPerPixel", 1, where) or 1)
    if samples != 1:
        raise InvalidInput(f"{where}: {s.name} has {samples} samples per pixel (colour), not a grey-level slice")


Geometry = tuple[
    tuple[float, float, float], tuple[float, float, float, float, float, float], tuple[float, float, float]
]


def _order(slices: list[_Slice], where: str) -> tuple[list[_Slice], float, Geometry | None]:
    """Slices in order, the slice spacing, and (origin, orientation, step) when positions are known."""
    positions = [_floats(s.ds, "ImagePositionPatient", 3) for s in slices]
    orientations = [_floats(s.ds, "ImageOrientationPatient", 6) for s in slices]
    if all(p is not None for p in positions) and all(o is not None for o in orientations):
        iop = np.array(orientations, dtype=np.float64)
        if not np.allclose(iop, iop[0], atol=1e-4):
            raise InvalidInput(f"{where}: slices have different orientations (ImageOrientationPatient)")
        normal = np.cross(iop[0, :3], iop[0, 3:])
        if np.linalg.norm(normal) < 0.5:
            raise InvalidInput(f"{where}: ImageOrientationPatient rows and columns are parallel")
        ipp = np.array(positions, dtype=np.float64)
        distance = ipp @ normal
        order = np.argsort(distance, kind="stable")
        ordered = [slices[i] for i in order]
        spacing = _even(distance[order], [s.name for s in ordered], where) or _nominal(slices[0], where)
        first, last = ipp[order[0]], ipp[order[-1]]
        step = (last - first) / (len(slices) - 1) if len(slices) > 1 else normal * spacing
        six = tuple(float(v) for v in iop[0])
        geometry: Geometry = (_triple(first), (six[0], six[1], six[2], six[3], six[4], six[5]), _triple(step))
        return ordered, spacing, geometry
    if len(slices) == 1:
        return slices, _nominal(slices[0], where), None
    numbers = [_number(s, "InstanceNumber", None, where) for s in slices]
    if any(n is None for n in numbers):
        raise InvalidInput(f"{where}: slices have no ImagePositionPatient/ImageOrientationPatient, no InstanceNumber")
    if len(set(numbers)) != len(numbers):
        raise InvalidInput(f"{where}: slices have no positions and repeat an InstanceNumber")
    ordered = [s for _, s in sorted(zip(numbers, slices, strict=True), key=lambda pair: pair[0] or 0)]
    return ordered, _nominal(slices[0], where), None


def _even(distance: npt.NDArray[np.float64], names: list[str], where: str) -> float | None:
    """The gap between slices, refusing repeats and uneven gaps; None for a single slice."""
    if len(distance) < 2:
        return None
    gaps = np.diff(distance)
    if gaps.min() < 1e-3:
        at = int(np.argmin(gaps))
        raise InvalidInput(f"{where}: {names[at]} and {names[at + 1]} are at the same position")
    mean = float(gaps.mean())
    if float(gaps.max() - gaps.min()) > max(1e-2 * mean, 1e-3):
        raise InvalidInput(
            f"{where}: uneven slice spacing, from {gaps.min():.4g} to {gaps.max():.4g} mm (a missing slice?)"
        )
    return mean


def _nominal(s: _Slice, where: str) -> float:
    """Slice spacing from the header, for volumes without positions."""
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = _number(s, keyword, None, where)
        if value is not None and value > 0:
            return value
    return 1.0


def _pixel_spacing(slices: list[_Slice], where: str) -> tuple[float, float]:
    found = [_floats(s.ds, "PixelSpacing", 2) for s in slices]
    first = found[0]
    if any(f is None for f in found) and first is not None:
        raise InvalidInput(f"{where}: some slices have no PixelSpacing")
    if first is None:
        return 1.0, 1.0
    if not np.allclose(np.array(found, dtype=np.float64), first, rtol=1e-4, atol=1e-6):
        raise InvalidInput(f"{where}: slices have different PixelSpacing")
    return first[0], first[1]


def _stack(slices: list[_Slice], shape: tuple[int, int], where: str) -> npt.NDArray[Any]:
    """Read pixels slice by slice, rescaled; int16 while every value is a whole number that fits, else float32."""
    rescale = [(_number(s, "RescaleSlope", 1.0, where), _number(s, "RescaleIntercept", 0.0, where)) for s in slices]
    whole = all(m.is_integer() and b.is_integer() for m, b in rescale)
    out = np.empty((len(slices), *shape), dtype=np.int16 if whole else np.float32)
    for k, s in enumerate(slices):
        pixels = _pixels(s, where)
        if pixels.shape != shape:
            raise InvalidInput(f"{where}: {s.name} decodes to {pixels.shape}, not Rows×Columns {shape}")
        slope, intercept = rescale[k]
        if out.dtype == np.int16 and np.issubdtype(pixels.dtype, np.integer):
            values = pixels.astype(np.int64) * int(slope) + int(intercept)
            if values.min() >= _INT16.min and values.max() <= _INT16.max:
                out[k] = values
                continue
        if out.dtype == np.int16:
            out = out.astype(np.float32)
        out[k] = pixels.astype(np.float64) * slope + intercept
    return out


def _pixels(s: _Slice, where: str) -> npt.NDArray[Any]:
    try:
        ds = pydicom.dcmread(s.path, force=True)
        pixels: npt.NDArray[Any] = ds.pixel_array
    except (InvalidDicomError, EOFError, OSError) as exc:
        raise InvalidInput(f"{where}: {s.name}: not readable as DICOM ({type(exc).__name__})") from exc
    except (RuntimeError, NotImplementedError, ValueError, AttributeError, KeyError) as exc:
        raise InvalidInput(f"{where}: {s.name}: pixel data cannot be decoded: {exc}") from exc
    return pixels


@overload
def _number(s: _Slice, keyword: str, default: float, where: str) -> float: ...
@overload
def _number(s: _Slice, keyword: str, default: None, where: str) -> float | None: ...
def _number(s: _Slice, keyword: str, default: float | None, where: str) -> float | None:
    """A single-valued numeric attribute, ``default`` when absent or empty; refused when not a number."""
    value = s.ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{where}: {s.name} has an unreadable {keyword}") from None


def _floats(ds: Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count else None


def _triple(v: npt.NDArray[np.float64]) -> tuple[float, float, float]:
    return float(v[0]), float(v[1]), float(v[2])


def _npy(voxels: npt.NDArray[Any]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, voxels, allow_pickle=False)
    return buffer.getvalue()
