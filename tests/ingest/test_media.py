"""Media types: magic bytes first, extension second, gzip looked into."""

from __future__ import annotations

import gzip
import io
import struct

import numpy as np
import pytest

from medbridge.ingest import nifti
from medbridge.ingest.media import HEAD, media_type


def npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.arange(5))
    return buffer.getvalue()


def nifti2() -> bytes:
    hdr = bytearray(544)
    struct.pack_into("<i", hdr, 0, 540)
    hdr[4:12] = b"n+2\0\r\n\x1a\n"
    return bytes(hdr)


NII = nifti.encode(np.zeros((2, 3, 4), dtype=np.int16), (1.0, 1.0, 1.0))


@pytest.mark.parametrize(
    ("head", "name", "expected"),
    [
        (b"\0" * 128 + b"DICM" + b"\2\0\0\0UL\4\0", "IM0001", "application/dicom"),
        (b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100", "no-preamble", "application/dicom"),
        (b"\x08\x00\x05\x00\x0a\x00\x00\x00ISO_IR 100", "implicit-vr", "application/dicom"),
        (NII, "brain.nii", "image/nifti"),
        (NII, "misnamed.csv", "image/nifti"),
        (gzip.compress(NII), "brain.nii.gz", "image/nifti"),
        (nifti2(), "brain.nii", "image/nifti"),
        (b"NRRD0004\ntype: short\n", "ct.nrrd", "image/nrrd"),
        (b"ObjectType = Image\nNDims = 3\n", "ct.mha", "image/x-metaimage"),
        (npy(), "a.npy", "application/x-npy"),
        (npy(), "a.bin", "application/x-npy"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "x.png", "image/png"),
        (b"PK\x03\x04" + b"\0" * 20, "x.zip", "application/zip"),
        (gzip.compress(b"hello"), "x.gz", "application/gzip"),
        (b"id,label\n1,lung\n", "labels.csv", "text/csv"),
        (b'{"a": 1}\n', "meta.json", "application/json"),
        (b"id,label\n1,lung\n", "labels", "text/plain"),
        ("naïve ünïcode\n".encode(), "README", "text/plain"),
        (b"\x00\x01\x02\xff" * 10, "blob", "application/octet-stream"),
        (b"\x00\x01\x02\xff" * 10, "blob.dcm", "application/dicom"),
        (b"\x00\x01\x02\xff" * 10, "blob.npy", "application/x-npy"),
        (b"", "empty.csv", "application/x-empty"),
    ],
)
def test_media_type(head: bytes, name: str, expected: str) -> None:
    assert media_type(head, name) == expected


def test_text_cut_inside_a_character_is_still_text() -> None:
    head = ("é" * HEAD).encode()[: HEAD - 1] + b"\xc3"
    assert len(head) == HEAD
    assert media_type(head, "notes.csv") == "text/csv"
    assert media_type(head[:100] + b"\xc3", "notes.csv") == "application/octet-stream"
