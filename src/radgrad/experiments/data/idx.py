"""IDX, MNIST's file format: a header (magic, dims) and the array's bytes, big-endian.

The header is read first and only the payload size it declares is read
after it, so a file (or a gzip bomb) can never make radgrad read more than
the header promises, nor more than :data:`IDX_LIMIT`.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import IO

import numpy as np

from .bounded import DataFileError, SizeLimit, open_bounded

IDX_LIMIT = SizeLimit(
    256 * 2**20,
    "the largest 10-class dataset in MNIST's format, EMNIST Digits, has 188,160,016 bytes of training images",
)

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_MAX_NDIM = 32  # what every numpy supports (numpy 2 allows 64)


def read_idx(stream: IO[bytes], name: str, limit: SizeLimit = IDX_LIMIT) -> np.ndarray:
    """Read one IDX array from ``stream``, which must hold exactly what its header declares.

    Args:
        stream: a binary stream at the start of the (gunzipped) file.
        name: the file's name, used in error messages.
        limit: the largest file (header and data) to accept.

    Returns:
        The array, with the shape and native-endian dtype the header gives.

    Raises:
        ValueError: if the header is malformed, declares a file larger than ``limit``,
            or the data is shorter or longer than it declares.
    """
    head = stream.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise ValueError(f"radgrad: {name}: not an IDX file (magic number must start with two zero bytes)")
    code, ndim = head[2], head[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"radgrad: {name}: unknown IDX data type code 0x{code:02x}")
    if ndim == 0:
        raise ValueError(f"radgrad: {name}: IDX header has no dimensions")
    if ndim > _MAX_NDIM:
        raise ValueError(
            f"radgrad: {name}: IDX header declares {ndim} dimensions, at most {_MAX_NDIM} are allowed"
        )
    header_size = 4 + 4 * ndim
    raw_dims = stream.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise ValueError(
            f"radgrad: {name}: IDX header truncated ({ndim} dimensions need {header_size} bytes)"
        )
    dims = tuple(int.from_bytes(raw_dims[i : i + 4], "big") for i in range(0, 4 * ndim, 4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = math.prod(dims) * dtype.itemsize  # a Python int: no overflow, however large the dims
    if header_size + expected > limit.max_bytes:
        raise DataFileError(
            f"radgrad: {name}: IDX header declares dims {dims}, a file of {header_size + expected:,} bytes, "
            f"more than the {limit.max_bytes:,} allowed ({limit.reason})"
        )
    payload = np.empty(expected, np.uint8)
    view, got = memoryview(payload), 0
    while got < expected:
        n = stream.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    if got != expected:
        raise ValueError(f"radgrad: {name}: header says dims {dims} ({expected} bytes) but file holds {got}")
    if stream.read(1):
        raise ValueError(
            f"radgrad: {name}: header says dims {dims} ({expected} bytes) but the file goes on after them"
        )
    return payload.view(dtype).reshape(dims).astype(dtype.newbyteorder("="), copy=False)


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse the contents of an IDX file (MNIST's format) into an array.

    Args:
        data: the whole (already gunzipped) file contents.
        name: the file's name, used in error messages.

    Returns:
        The array, with the shape and native-endian dtype the header gives.

    Raises:
        ValueError: if the header is malformed, declares more than 256 MiB
            (:data:`IDX_LIMIT`), or the data size disagrees with it.
    """
    return read_idx(io.BytesIO(data), name)


def read_idx_file(path: Path) -> np.ndarray:
    """The array in IDX file ``path`` (gzipped or not), reading no more than its header declares."""
    with open_bounded(path, IDX_LIMIT) as f:
        return read_idx(f, str(path))


def find_idx_file(folder: Path, stem: str) -> Path | None:
    """The IDX file ``stem`` in ``folder``: plain or ``.gz``, ``-idx`` or ``.idx`` spelling."""
    for base in (stem, stem.replace("-idx", ".idx")):
        for name in (base, base + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None
