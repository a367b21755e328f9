"""Media types by content: magic bytes first, the file name's extension second.

``media_type`` is pure: it judges the first ``HEAD`` bytes of a file and its name.
Gzip streams are looked into (``.nii.gz`` is ``image/nifti``); other archives are
typed, never opened.
"""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import PurePath

#: How many leading bytes of a file ``media_type`` wants to see.
HEAD = 64 * 1024

DICOM = "application/dicom"
NIFTI = "image/nifti"
GZIP = "application/gzip"
EMPTY = "application/x-empty"
OCTET_STREAM = "application/octet-stream"

_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x93NUMPY", "application/x-npy"),
    (0, b"NRRD000", "image/nrrd"),
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"II*\x00", "image/tiff"),
    (0, b"MM\x00*", "image/tiff"),
    (0, b"%PDF-", "application/pdf"),
    (0, b"\x89HDF\r\n\x1a\n", "application/x-hdf5"),
    (0, b"PK\x03\x04", "application/zip"),
    (0, b"PK\x05\x06", "application/zip"),
    (0, b"BZh", "application/x-bzip2"),
    (0, b"\xfd7zXZ\x00", "application/x-xz"),
    (0, b"\x28\xb5\x2f\xfd", "application/zstd"),
    (257, b"ustar", "application/x-tar"),
)

#: Types for text content, by extension; other text is ``text/plain``.
_TEXT_EXTENSIONS = {
    ".csv": "text/csv",
    ".tsv": "text/tab-separated-values",
    ".json": "application/json",
    ".jsonl": "application/x-ndjson",
    ".xml": "application/xml",
    ".yaml": "application/yaml",
    ".yml": "application/yaml",
    ".toml": "application/toml",
    ".md": "text/markdown",
    ".html": "text/html",
}

#: Types for binary content without a known signature, by extension.
_BINARY_EXTENSIONS = {
    ".dcm": DICOM,
    ".dicom": DICOM,
    ".nii": NIFTI,
    ".nrrd": "image/nrrd",
    ".npy": "application/x-npy",
}

_METAIMAGE = re.compile(rb"^\s*ObjectType\s*=\s*Image\s*$", re.MULTILINE)
#: Explicit-VR codes, to recognise a DICOM data set written without preamble and meta header.
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)


def media_type(head: bytes, name: str) -> str:
    """The media type of a file whose first bytes are ``head`` (up to ``HEAD``) and whose name is ``name``."""
    if not head:
        return EMPTY
    found = _signature(head)
    if found:
        return found
    if head[:2] == b"\x1f\x8b":
        inner = gunzip_head(head)
        return NIFTI if inner is not None and _is_nifti(inner) else GZIP
    suffix = PurePath(name).suffix.lower()
    if _is_text(head, len(head) >= HEAD):
        return _TEXT_EXTENSIONS.get(suffix, "text/plain")
    return _BINARY_EXTENSIONS.get(suffix, OCTET_STREAM)


def gunzip_head(head: bytes) -> bytes | None:
    """The first decompressed bytes of a gzip stream that starts with ``head``, or None if it is not one."""
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 1024)
    except zlib.error:
        return None


def is_raw_dicom(head: bytes) -> bool:
    """Whether ``head`` starts like a DICOM data set stored without the 128-byte preamble and ``DICM``."""
    if len(head) < 8:
        return False
    group, element = struct.unpack_from("<HH", head)
    if group not in (0x0002, 0x0008) or element > 0x0020:
        return False
    if head[4:6] in _VRS:
        return True
    length: int = struct.unpack_from("<I", head, 4)[0]
    return group == 0x0008 and length % 2 == 0 and length < 1024


def _signature(head: bytes) -> str | None:
    if head[128:132] == b"DICM":
        return DICOM
    if _is_nifti(head):
        return NIFTI
    for offset, magic, kind in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return kind
    if is_raw_dicom(head):
        return DICOM
    if _METAIMAGE.search(head[:1024]):
        return "image/x-metaimage"
    return None


def _is_nifti(head: bytes) -> bool:
    if head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return head[:4] in (struct.pack("<i", 348), struct.pack(">i", 348))
    if head[4:12] in (b"n+2\x00\r\n\x1a\n", b"ni2\x00\r\n\x1a\n"):
        return head[:4] in (struct.pack("<i", 540), struct.pack(">i", 540))
    return False


def _is_text(head: bytes, cut: bool) -> bool:
    """UTF-8 without NUL bytes; a multi-byte character cut off at the end of ``head`` is allowed."""
    if b"\x00" in head:
        return False
    for trim in range(4 if cut else 1):
        try:
            head[: len(head) - trim].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return True
    return False
