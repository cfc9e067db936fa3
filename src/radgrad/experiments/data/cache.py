"""The on-disk cache of decoded datasets: one ``.npz`` per source, keyed by its files' stamps."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from .dataset import Dataset

CACHE_ENV = "RADGRAD_CACHE"

_CACHE_FORMAT = 1  # bump to invalidate every cache file written before


def default_cache_dir() -> Path:
    """The cache directory: ``$RADGRAD_CACHE`` if set, else ``~/.cache/radgrad``.

    Returns:
        The directory path (it may not exist yet).
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "radgrad"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None, cache: bool) -> Path | None:
    """The cache directory a loader's ``cache_dir=`` and ``cache=`` arguments select (None: off)."""
    if not cache:
        return None
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _cache_path(kind: str, files: Iterable[Path], cache_dir: Path) -> Path:
    """Cache file for ``kind`` built from ``files``, keyed by their path, size and mtime."""
    stamps = []
    for f in files:
        st = f.stat()
        stamps.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    key = json.dumps([_CACHE_FORMAT, kind, stamps])
    return cache_dir / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"


def _read_cache(path: Path) -> Dataset | None:
    """The dataset stored at ``path``, or None if it is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("train_x", "train_y", "test_x", "test_y")}
            classes = tuple(str(c) for c in z["classes"])
        return Dataset(classes=classes, **arrays)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # a damaged or foreign file: rebuild it


def _write_cache(path: Path, ds: Dataset) -> None:
    """Write ``ds`` to ``path`` atomically (temp file, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f, train_x=ds.train_x, train_y=ds.train_y, test_x=ds.test_x,
                test_y=ds.test_y, classes=np.array(ds.classes, dtype=str),
            )  # fmt: skip
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached(kind: str, files: Sequence[Path], build: Callable[[], Dataset], cache_dir: Path | None) -> Dataset:
    """Load ``kind`` from the cache, or ``build()`` it and store it there.

    With ``cache_dir`` None caching is off. A cache that cannot be written
    only warns: the freshly built dataset is returned anyway.
    """
    if cache_dir is None:
        return build()
    path = _cache_path(kind, files, cache_dir)
    ds = _read_cache(path)
    if ds is None:
        ds = build()
        try:
            _write_cache(path, ds)
        except OSError as e:
            warnings.warn(f"radgrad: could not write cache file {path}: {e}", RuntimeWarning, stacklevel=3)
    return ds
