"""Reading data files, gzipped or not, without ever taking in more than a set number of bytes.

A 300 KB gzip can unpack to 300 MB, so the size is checked while reading,
never after: a :class:`BoundedReader` stops one byte past its limit.
"""

from __future__ import annotations

import gzip
import os
import tarfile
import zipfile
import zlib
from types import TracebackType
from typing import IO, NamedTuple

GZIP_MAGIC = b"\x1f\x8b"

# What a damaged file or archive member raises while it is being read.
_READ_ERRORS = (OSError, EOFError, zlib.error, zipfile.BadZipFile, tarfile.TarError)


class DataFileError(ValueError):
    """A data file that cannot be read, or that holds more than its format allows.

    The message already names the file, so loaders let it through unchanged.
    """


class SizeLimit(NamedTuple):
    """The most bytes radgrad reads from one kind of file, and why that many."""

    max_bytes: int
    reason: str


class BoundedReader:
    """A binary stream that lets through at most ``limit.max_bytes`` bytes of ``stream``.

    Reads are served up to one byte past the limit, so that a longer stream
    is noticed; a request for more than that (a pickle declaring a huge
    object, say) fails before anything is read. It has what
    :class:`pickle.Unpickler` needs: ``read``, ``readinto``, ``readline``
    and ``peek``.

    Raises (from its reads):
        DataFileError: naming the file, if the stream goes past the limit or
            the underlying read fails (a truncated gzip, a bad zip member...).
    """

    def __init__(self, stream: IO[bytes], limit: SizeLimit, name: str, gzipped: bool = False) -> None:
        self._stream = stream
        self._limit = limit
        self._name = name
        self._gzipped = gzipped
        self._count = 0

    def _room(self, n: int | None) -> int:
        """How many bytes a request for ``n`` (None or negative: all) may read."""
        room = self._limit.max_bytes - self._count + 1
        if n is None or n < 0:
            return room
        if n > room:
            raise self._too_large()
        return n

    def _took(self, n: int) -> None:
        self._count += n
        if self._count > self._limit.max_bytes:
            raise self._too_large()

    def _too_large(self) -> DataFileError:
        unpacked = " once gunzipped" if self._gzipped else ""
        return DataFileError(
            f"radgrad: {self._name}: holds more than {self._limit.max_bytes:,} bytes{unpacked}, "
            f"the most allowed for this file ({self._limit.reason})"
        )

    def _cannot_read(self, e: BaseException) -> DataFileError:
        return DataFileError(f"radgrad: {self._name}: cannot read ({e})")

    def read(self, n: int | None = -1) -> bytes:
        try:
            data = self._stream.read(self._room(n))
        except _READ_ERRORS as e:
            raise self._cannot_read(e) from e
        self._took(len(data))
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        view = memoryview(buffer).cast("B")
        try:
            got = self._stream.readinto(view[: self._room(len(view))])  # type: ignore[attr-defined]
        except _READ_ERRORS as e:
            raise self._cannot_read(e) from e
        self._took(got)
        return got

    def readline(self, n: int | None = -1) -> bytes:
        try:
            line = self._stream.readline(self._room(n))
        except _READ_ERRORS as e:
            raise self._cannot_read(e) from e
        self._took(len(line))
        return line

    def peek(self, n: int = 1) -> bytes:
        """Buffered bytes ahead, without consuming them (only what is consumed counts)."""
        peek = getattr(self._stream, "peek", None)
        if peek is None:
            raise NotImplementedError("peek")  # pickle then reads without prefetching
        try:
            return peek(n)
        except _READ_ERRORS as e:
            raise self._cannot_read(e) from e

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> BoundedReader:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_bounded(path: str | os.PathLike[str], limit: SizeLimit, *, gunzip: bool = True) -> BoundedReader:
    """Open ``path`` for reading at most ``limit`` bytes, gunzipping it if it starts like a gzip.

    Args:
        path: the file.
        limit: the most bytes to read from it (after gunzipping).
        gunzip: set False to read gzip-looking files as they are.

    Raises:
        DataFileError: if the file cannot be opened.
    """
    try:
        with open(path, "rb") as probe:
            gzipped = gunzip and probe.read(2) == GZIP_MAGIC
        stream = gzip.open(path, "rb") if gzipped else open(path, "rb")
    except OSError as e:
        raise DataFileError(f"radgrad: {path}: cannot read ({e})") from e
    return BoundedReader(stream, limit, str(path), gzipped=gzipped)
