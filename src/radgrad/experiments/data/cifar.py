"""CIFAR-10: the official pickled batches (folder or ``.tar.gz``), or an image-folder tree."""

from __future__ import annotations

import os
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import images
from .bounded import BoundedReader, DataFileError, SizeLimit, open_bounded
from .cache import cached, resolve_cache_dir
from .dataset import Dataset, check_labels
from .unpickle import load_pickle

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
DATA_ENV = "RADGRAD_DATA"
CIFAR_BATCH_LIMIT = SizeLimit(64 * 2**20, "an official CIFAR-10 batch file is about 31 MB")
CIFAR_TAR_LIMIT = SizeLimit(512 * 2**20, "the official cifar-10-python.tar.gz unpacks to about 186 MB")
CIFAR_TAR_MAX_MEMBERS = 1000

_REPO_ROOT = Path(__file__).resolve().parents[4]
_CIFAR_DEFAULT_NAMES = ("cifar10-jpeg.zip", "cifar-10-batches-py", "cifar-10-python.tar.gz")
_CIFAR_BATCHES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
_CIFAR_META = "batches.meta"
_CIFAR_HOWTO = (
    "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
    "extract it and pass the cifar-10-batches-py folder (or the .tar.gz itself) as source, "
    f"or point {DATA_ENV} at a train/<class>/*, test/<class>/* image folder or zip"
)


def _field(d: dict[Any, Any], key: str, where: str) -> Any:
    """``d[key]``, accepting ``str`` or ``bytes`` keys (Python 2 vs 3 pickles)."""
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    raise ValueError(f"radgrad: {where}: missing key {key!r}")


def _describe(value: Any) -> str:
    """A short description of an unpickled value for error messages."""
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array {value.shape}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def _cifar_batch(obj: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode one unpickled CIFAR-10 batch into HWC uint8 images and int64 labels.

    The batch's ``data`` must be a uint8 numpy array (n, 3072) and its
    ``labels`` n integers in 0..9, as a list or a numpy array.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"radgrad: {where}: expected a dict, got {type(obj).__name__}")
    data, raw_labels = _field(obj, "data", where), _field(obj, "labels", where)
    is_rows = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
    if not (is_rows and data.shape[1] == 3 * 32 * 32):
        raise ValueError(f"radgrad: {where}: expected uint8 data (n, 3072), got {_describe(data)}")
    labels = raw_labels if isinstance(raw_labels, np.ndarray) else None
    # Elements are checked before numpy sees them: 10,000 references to one long string
    # would make np.asarray build 10,000 copies of it.
    if isinstance(raw_labels, (list, tuple)) and all(isinstance(v, (int, np.integer)) for v in raw_labels):
        try:
            labels = np.array(raw_labels, dtype=np.int64)
        except OverflowError:
            pass  # reported below
    if labels is None or labels.shape != data.shape[:1] or (labels.size and labels.dtype.kind not in "iu"):
        raise ValueError(
            f"radgrad: {where}: expected {len(data)} integer labels, got {_describe(raw_labels)}"
        )
    labels = labels.astype(np.int64)
    check_labels(labels, len(CIFAR10_CLASSES), where)
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels


def _cifar_meta_classes(meta: Any, where: str) -> tuple[str, ...]:
    """The ``label_names`` of an unpickled ``batches.meta``: at most 100 names of at most 100 characters.

    The limits keep decoding cheap: a list may repeat a reference to one long bytes object.
    """
    names = _field(meta, "label_names", where) if isinstance(meta, dict) else None
    if not (
        isinstance(names, list)
        and len(names) <= 100
        and all(isinstance(n, (str, bytes)) and len(n) <= 100 for n in names)
    ):
        raise ValueError(
            f"radgrad: {where}: expected a dict whose 'label_names' is a list of at most 100 names "
            "of at most 100 characters"
        )
    return tuple(n.decode() if isinstance(n, bytes) else n for n in names)


def _decode_file(name: str, obj: Any, where: str) -> Any:
    """An unpickled batch file decoded: (images, labels), or the class names of ``batches.meta``."""
    return _cifar_meta_classes(obj, where) if name == _CIFAR_META else _cifar_batch(obj, where)


def _cifar_batches_dataset(decoded: dict[str, Any]) -> Dataset:
    """Assemble CIFAR-10 from the :func:`_decode_file` results, by file name."""
    train = [decoded[n] for n in _CIFAR_BATCHES[:-1]]
    return Dataset(
        train_x=np.concatenate([x for x, _ in train]), train_y=np.concatenate([y for _, y in train]),
        test_x=decoded["test_batch"][0], test_y=decoded["test_batch"][1],
        classes=decoded.get(_CIFAR_META, CIFAR10_CLASSES),
    )  # fmt: skip


def _cifar_batches_dir(folder: Path) -> Dataset:
    decoded = {}
    for name in (*_CIFAR_BATCHES, _CIFAR_META):
        if (folder / name).is_file():
            where = f"{folder}/{name}"
            with open_bounded(folder / name, CIFAR_BATCH_LIMIT, gunzip=False) as f:
                decoded[name] = _decode_file(name, load_pickle(f, where), where)
    return _cifar_batches_dataset(decoded)


def _tar_members(tar: tarfile.TarFile, path: Path) -> Iterator[tarfile.TarInfo]:
    """The members of ``tar``, refusing more than the official archive could need.

    Skipping an entry still unpacks it, hence a limit on the archive as a whole.
    """
    for count, member in enumerate(tar, 1):
        if count > CIFAR_TAR_MAX_MEMBERS:
            raise DataFileError(
                f"radgrad: {path}: holds more than {CIFAR_TAR_MAX_MEMBERS} entries, the most allowed "
                "(the official archive has 9)"
            )
        if member.offset_data + member.size > CIFAR_TAR_LIMIT.max_bytes:
            raise DataFileError(
                f"radgrad: {path}: entry {member.name} ends past {CIFAR_TAR_LIMIT.max_bytes:,} bytes once "
                f"unpacked, the most allowed ({CIFAR_TAR_LIMIT.reason})"
            )
        yield member


def _cifar_batches_tar(path: Path) -> Dataset:
    """Build CIFAR-10 straight from ``cifar-10-python.tar.gz`` (members in any folder)."""
    wanted = {*_CIFAR_BATCHES, _CIFAR_META}
    decoded: dict[str, Any] = {}
    with tarfile.open(path) as tar:
        for member in _tar_members(tar, path):  # one streaming pass: no seeking back in the gzip
            name = member.name.rsplit("/", 1)[-1]
            f = tar.extractfile(member) if member.isfile() and name in wanted else None
            if f is not None:
                where = f"{path}/{member.name}"
                with BoundedReader(f, CIFAR_BATCH_LIMIT, where) as bounded:
                    decoded[name] = _decode_file(name, load_pickle(bounded, where), where)
    missing = [n for n in _CIFAR_BATCHES if n not in decoded]
    if missing:
        raise FileNotFoundError(
            f"radgrad: CIFAR-10 archive {path} lacks {', '.join(missing)}; {_CIFAR_HOWTO}"
        )
    return _cifar_batches_dataset(decoded)


def _cifar_plan(path: Path) -> tuple[list[Path], Callable[[], Dataset]] | None:
    """If ``path`` holds CIFAR-10 in a known layout: (files it depends on, builder)."""
    if path.is_file() and zipfile.is_zipfile(path):
        return [path], lambda: images.zip_dataset(path)
    if path.is_file() and tarfile.is_tarfile(path):
        return [path], lambda: _cifar_batches_tar(path)
    if path.is_dir() and (path / "cifar-10-batches-py").is_dir():
        path = path / "cifar-10-batches-py"
    if path.is_dir() and any((path / n).is_file() for n in _CIFAR_BATCHES):
        missing = [n for n in _CIFAR_BATCHES if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"radgrad: CIFAR-10 batches folder {path} lacks {', '.join(missing)}; {_CIFAR_HOWTO}"
            )
        files = [path / n for n in (*_CIFAR_BATCHES, _CIFAR_META) if (path / n).is_file()]
        return files, lambda: _cifar_batches_dir(path)
    if path.is_dir() and (path / "train").is_dir() and (path / "test").is_dir():
        files = images.dir_files(path)
        return files, lambda: images.dir_dataset(path, files)
    return None


def cifar10_candidates() -> list[Path]:
    """Where :func:`load_cifar10` looks when given no source, in order.

    Returns:
        ``$RADGRAD_DATA`` (if set) and the known file names inside it, then
        ``cifar10-jpeg.zip``, ``cifar-10-batches-py`` and ``cifar-10-python.tar.gz``
        in ``../shared/data`` relative to the current directory and to the
        repository root.
    """
    env = os.environ.get(DATA_ENV)
    bases = [Path.cwd() / ".." / "shared" / "data", _REPO_ROOT / ".." / "shared" / "data"]
    out = [Path(env).expanduser()] if env else []
    if env:
        bases.insert(0, Path(env).expanduser())
    out += [base / name for base in bases for name in _CIFAR_DEFAULT_NAMES]
    unique: dict[str, Path] = {}
    for p in out:
        unique.setdefault(os.path.normpath(p.absolute()), p)
    return [Path(k) for k in unique]


def _check_cifar10(ds: Dataset, where: Path) -> Dataset:
    """``ds`` itself if it is CIFAR-10 shaped, else a ValueError naming ``where``."""
    if ds.train_x.shape[1:] != (32, 32, 3) or ds.classes != CIFAR10_CLASSES:
        raise ValueError(
            f"radgrad: {where} is not CIFAR-10: images {ds.train_x.shape[1:]} (want (32, 32, 3)), "
            f"classes {list(ds.classes)} (want {list(CIFAR10_CLASSES)})"
        )
    return ds


def load_cifar10(
    source: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
) -> Dataset:
    """Load CIFAR-10 as uint8 HWC arrays.

    Args:
        source: one of
            * the official ``cifar-10-batches-py`` folder, or a folder holding it
              (batch files of at most 64 MiB, labels 0..9);
            * ``cifar-10-python.tar.gz`` (at most 1000 entries and 512 MiB unpacked);
            * an image-folder tree ``train/<class>/*`` and ``test/<class>/*``
              (images of at most 1 MiB and 1024x1024 pixels), as a directory or
              a zip whose member paths are relative and free of ``..``.
            None tries :func:`cifar10_candidates` in order.
        cache_dir: where decoded arrays are cached; default :func:`default_cache_dir`.
        cache: set False to neither read nor write the cache.

    Returns:
        A :class:`Dataset` with train_x (50000, 32, 32, 3) and test_x
        (10000, 32, 32, 3) uint8, int64 labels and classes :data:`CIFAR10_CLASSES`.

    Raises:
        FileNotFoundError: if no CIFAR-10 data is found, saying where it looked.
        ValueError: if the data is malformed, larger than allowed or not
            CIFAR-10 shaped; the message names the file.
        pickle.UnpicklingError: if a pickle references a forbidden global.
    """
    cache_path = resolve_cache_dir(cache_dir, cache)
    if source is not None:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"radgrad: CIFAR-10 source {path} does not exist (source=); {_CIFAR_HOWTO}"
            )
        plan = _cifar_plan(path)
        if plan is None:
            raise FileNotFoundError(
                f"radgrad: CIFAR-10 source {path} is neither a cifar-10-batches-py folder, a .tar.gz of it, "
                f"nor a train/<class>/, test/<class>/ image folder or zip; {_CIFAR_HOWTO}"
            )
    else:
        looked = cifar10_candidates()
        plan = next((p for p in map(_cifar_plan, looked) if p is not None), None)
        if plan is None:
            where = "\n  ".join(str(p) for p in looked)
            raise FileNotFoundError(f"radgrad: CIFAR-10 not found; looked in:\n  {where}\n{_CIFAR_HOWTO}")
    files, build = plan
    return cached("cifar10", files, lambda: _check_cifar10(build(), files[0]), cache_path)
