"""The NIfTI-1 writer and reader: int16, uint8 and float32, spacing, an optional sform."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from medbridge.errors import InvalidInput
from medbridge.ingest import nifti


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_round_trip(dtype: type) -> None:
    volume = (np.arange(2 * 3 * 4).reshape(2, 3, 4) * 1.5).astype(dtype)
    back, spacing = nifti.decode(nifti.encode(volume, (2.5, 0.5, 0.75)))
    assert back.dtype == volume.dtype and np.array_equal(back, volume)
    assert spacing == pytest.approx((2.5, 0.5, 0.75))


def test_affine_is_written_as_the_sform() -> None:
    affine = np.array([[-0.5, 0, 0, 10], [0, -0.5, 0, 20], [0, 0, 2.5, -30], [0, 0, 0, 1]])
    data = nifti.encode(np.zeros((2, 2, 2), np.int16), (2.5, 0.5, 0.5), affine)
    assert struct.unpack_from("<h", data, 254)[0] == 1
    assert np.allclose(np.array(struct.unpack_from("<12f", data, 280)).reshape(3, 4), affine[:3])
    assert data[123] == 2  # millimetres
    with pytest.raises(InvalidInput, match="4x4"):
        nifti.encode(np.zeros((2, 2, 2), np.int16), (1, 1, 1), np.eye(3))


def test_other_types_are_refused() -> None:
    with pytest.raises(InvalidInput, match="int16, uint8 and float32, not float64"):
        nifti.encode(np.zeros((2, 2, 2)), (1, 1, 1))
