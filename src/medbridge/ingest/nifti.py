"""Minimal NIfTI-1 single-file (.nii) reading and writing for int16, uint8 and float32 volumes."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medbridge.errors import InvalidInput

_DTYPES: dict[int, np.dtype[Any]] = {4: np.dtype("<i2"), 2: np.dtype("u1"), 16: np.dtype("<f4")}
_CODES: dict[np.dtype[Any], int] = {dtype: code for code, dtype in _DTYPES.items()}
HEADER = 348
OFFSET = 352


def encode(
    volume: npt.NDArray[np.generic],
    spacing: tuple[float, float, float],
    affine: npt.NDArray[np.float64] | None = None,
) -> bytes:
    """A .nii file: 348-byte header, 4 bytes of extension flags, then the voxels (x fastest).

    ``volume`` is indexed ``[z, y, x]`` and ``spacing`` is in the same order, in mm.  An
    ``affine`` (4×4, voxel ``(x, y, z)`` to RAS mm) is written as the sform.
    """
    dtype = np.dtype(volume.dtype).newbyteorder("<")
    if dtype not in _CODES:
        raise InvalidInput(f"NIfTI writer supports int16, uint8 and float32, not {volume.dtype}")
    hdr = bytearray(HEADER)
    struct.pack_into("<i", hdr, 0, HEADER)
    dims = [3, *volume.shape[::-1], 1, 1, 1, 1]
    struct.pack_into("<8h", hdr, 40, *dims)
    struct.pack_into("<hh", hdr, 70, _CODES[dtype], dtype.itemsize * 8)
    struct.pack_into("<8f", hdr, 76, 1.0, *spacing[::-1], 0, 0, 0, 0)
    struct.pack_into("<f", hdr, 108, float(OFFSET))
    struct.pack_into("<ff", hdr, 112, 1.0, 0.0)
    hdr[123] = 2  # xyzt_units: millimetres
    if affine is not None:
        if np.shape(affine) != (4, 4):
            raise InvalidInput("NIfTI affine must be a 4x4 matrix")
        struct.pack_into("<h", hdr, 254, 1)  # sform_code: scanner coordinates
        struct.pack_into("<12f", hdr, 280, *np.asarray(affine, dtype=np.float64)[:3].ravel())
    struct.pack_into("<h", hdr, 252, 0)
    hdr[344:348] = b"n+1\0"
    return bytes(hdr) + b"\0\0\0\0" + np.ascontiguousarray(volume, dtype=dtype).tobytes()


def decode(data: bytes) -> tuple[npt.NDArray[np.generic], tuple[float, float, float]]:
    if len(data) < OFFSET or data[344:348] != b"n+1\0" or struct.unpack_from("<i", data, 0)[0] != HEADER:
        raise InvalidInput("not a little-endian single-file NIfTI-1 volume")
    dims = struct.unpack_from("<8h", data, 40)
    code = struct.unpack_from("<h", data, 70)[0]
    if code not in _DTYPES or dims[0] != 3:
        raise InvalidInput(f"unsupported NIfTI volume (datatype {code}, {dims[0]} dimensions)")
    pixdim = struct.unpack_from("<8f", data, 76)
    offset = int(struct.unpack_from("<f", data, 108)[0])
    shape = (dims[3], dims[2], dims[1])
    count = shape[0] * shape[1] * shape[2]
    voxels = np.frombuffer(data, dtype=_DTYPES[code], count=count, offset=offset).reshape(shape)
    return voxels, (pixdim[3], pixdim[2], pixdim[1])


def write(path: Path, volume: npt.NDArray[np.generic], spacing: tuple[float, float, float]) -> None:
    path.write_bytes(encode(volume, spacing))


def read(path: Path) -> tuple[npt.NDArray[np.generic], tuple[float, float, float]]:
    return decode(path.read_bytes())
