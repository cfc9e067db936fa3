"""A restricted unpickler for data made of builtins and numpy arrays, dtypes and scalars.

NOTE [bounded unpickling]
A pickle is a program, so a small one can ask for a lot. What the unpickler
builds stays proportional to the bytes it reads, because

* only numpy's own reconstruction functions may be called, and none of them
  allocates more than the pickle supplies: ``numpy.ndarray`` cannot be called
  with a shape, and ``_reconstruct`` must start from the empty array numpy
  itself always pickles;
* callers cap the bytes read (see ``bounded.py``).

Shared references are the one way around this: a list that repeats another
list a thousand times, which repeats a third, is a few KB of pickle that
``np.asarray`` or any walk over it turns into gigabytes. So the result is
also refused if, counting every occurrence of a shared object, it holds more
than ``max_items`` objects. Objects are counted, not their sizes, so code
that converts a result still checks element types first: ``np.asarray`` of
ten thousand references to one long string copies the string each time.
"""

from __future__ import annotations

import importlib
import pickle
from typing import IO, Any

import numpy as np

from .bounded import DataFileError

# An official CIFAR-10 batch holds about 20,000 objects (10,000 labels and 10,000 file names).
MAX_PICKLE_ITEMS = 1_000_000

# Besides UnpicklingError, what a malformed pickle makes the unpickler or numpy raise.
_MALFORMED = (
    EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OverflowError, MemoryError,
)  # fmt: skip


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


class _NdarrayType:
    """What a pickle gets for ``numpy.ndarray``: only good as ``_reconstruct``'s first argument."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise pickle.UnpicklingError(
            "radgrad: refused to call numpy.ndarray: it would allocate whatever shape the pickle declares"
        )


_NDARRAY = _NdarrayType()


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's ``_reconstruct``, limited to the empty array that ``ndarray.__reduce__`` emits."""
    if subtype is not _NDARRAY or not (isinstance(shape, tuple) and shape == (0,)):
        raise pickle.UnpicklingError(
            f"radgrad: refused numpy _reconstruct with shape {shape!r}: only (0,) of numpy.ndarray is allowed"
        )
    return _numpy_core("multiarray")._reconstruct(np.ndarray, (0,), dtype)


def _allowed_global(module: str, name: str) -> Any:
    """The object a pickle may reference as ``module.name``, or None if refused."""
    if module == "_codecs" and name == "encode":
        return _latin1_encode
    if module == "numpy" and name == "ndarray":
        return _NDARRAY
    if module == "numpy" and name == "dtype":
        return np.dtype
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
        return _reconstruct
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
        return _numpy_core("multiarray").scalar
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


def _check_items(obj: Any, max_items: int) -> None:
    """Refuse ``obj`` if it holds more than ``max_items`` objects, shared ones counted per occurrence.

    Each container's length is charged before its items are visited, so the
    walk stops after at most ``max_items`` steps whatever the pickle.
    """
    left = max_items
    todo = [obj]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            children: Any = (item.keys(), item.values())
            left -= 2 * len(item)
        elif isinstance(item, (list, tuple, set, frozenset)):
            children = (item,)
            left -= len(item)
        elif isinstance(item, np.ndarray) and item.dtype.hasobject:
            children = (item.ravel().tolist(),) if item.size <= left else ()
            left -= item.size
        else:
            continue
        if left < 0:
            raise pickle.UnpicklingError(
                f"radgrad: refused a pickle holding more than {max_items:,} objects "
                "(shared references counted every time they occur)"
            )
        for group in children:
            todo.extend(group)


def safe_pickle_load(file: IO[bytes], *, max_items: int = MAX_PICKLE_ITEMS) -> Any:
    """Unpickle data made only of builtins and numpy arrays, dtypes and scalars.

    Python 2 pickles (like MNIST's and CIFAR-10's) are read with
    ``encoding="latin1"``, so their byte strings come back as ``str``. What
    the pickle builds is proportional in size to the bytes it supplies (see
    NOTE [bounded unpickling] in this module); to bound those, pass a file
    that stops reading, as radgrad's loaders do.

    Args:
        file: a binary file object positioned at the start of a pickle.
        max_items: the most objects the result may hold, counting an object
            shared by several containers once per container.

    Returns:
        The unpickled object.

    Raises:
        pickle.UnpicklingError: if the pickle references any other global
            (such as ``os.system``), naming the refused global, calls
            ``numpy.ndarray`` directly, or holds more than ``max_items`` objects.
    """
    obj = _NumpyUnpickler(file, encoding="latin1").load()
    _check_items(obj, max_items)
    return obj


def load_pickle(file: IO[bytes], where: str) -> Any:
    """:func:`safe_pickle_load` of ``file``, with ``where`` named in every error.

    Raises:
        pickle.UnpicklingError: for a refused pickle.
        ValueError: for a malformed or truncated one, or (as
            :class:`~.bounded.DataFileError`) one that ``file`` refuses to read on.
    """
    try:
        return safe_pickle_load(file)
    except DataFileError:
        raise
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(f"radgrad: {where}: {e}") from e
    except _MALFORMED as e:
        raise ValueError(f"radgrad: {where}: not a readable pickle ({type(e).__name__}: {e})") from e
