"""Tests for radgrad.experiments.data.unpickle: what the restricted unpickler admits and what it refuses."""

from __future__ import annotations

import io
import os
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from radgrad.experiments.data import safe_pickle_load
from radgrad.experiments.data.unpickle import load_pickle


class _Reduce:
    """Pickles as ``func(*args)``: a way to write any call into a pickle."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (self.func, self.args)


def test_unpickler_refuses_os_system(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"data": _Reduce(os.system, f"touch {marker}")}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"refused to unpickle global (os|posix|nt)\.system"):
        safe_pickle_load(io.BytesIO(payload))
    assert not marker.exists()


def test_unpickler_refuses_non_latin1_codec() -> None:
    payload = pickle.dumps(b"x", protocol=2).replace(b"latin1", b"rot_13")
    with pytest.raises(pickle.UnpicklingError, match="encoding 'rot_13'"):
        safe_pickle_load(io.BytesIO(payload))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_unpickler_reads_numpy_objects(protocol: int) -> None:
    obj = {
        b"a": np.arange(12, dtype=">i4").reshape(3, 4),
        "b": np.ones((2, 2), np.float32).T,
        "c": [np.int64(7), np.float32(0.5), np.uint8(3)],
        "d": (1, 2.0, "s", b"bytes", None, True),
        "e": np.arange(6, dtype=np.float64).reshape(2, 3)[:, ::2],  # neither C nor F contiguous
        "f": np.array([[1, "x"]], dtype=object),
    }
    got = safe_pickle_load(io.BytesIO(pickle.dumps(obj, protocol=protocol)))
    for key in (b"a", "b", "e", "f"):
        np.testing.assert_array_equal(got[key], obj[key])
        assert got[key].dtype.newbyteorder("=") == obj[key].dtype.newbyteorder("=")  # numpy may swap
    assert got["c"] == obj["c"] and [type(v) for v in got["c"]] == [type(v) for v in obj["c"]]
    assert got["d"] == obj["d"]


def test_unpickler_refuses_calling_ndarray_with_a_shape() -> None:
    # numpy.ndarray((2**40,)) would allocate a terabyte that the pickle never supplies.
    payload = pickle.dumps(_Reduce(np.ndarray, (2**40,)), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refused to call numpy.ndarray"):
        safe_pickle_load(io.BytesIO(payload))
    # numpy.ndarray.__new__(numpy.ndarray, 2**31 - 1), by NEWOBJ: pickle.dumps will not write this one.
    payload = b"\x80\x02cnumpy\nndarray\nJ\xff\xff\xff\x7f\x85\x81."
    with pytest.raises(pickle.UnpicklingError, match="NEWOBJ class argument"):
        safe_pickle_load(io.BytesIO(payload))


def test_unpickler_refuses_reconstruct_with_a_shape() -> None:
    reconstruct = np.zeros(1).__reduce__()[0]
    payload = pickle.dumps(_Reduce(reconstruct, np.ndarray, (2**40,), b"b"), protocol=2)
    with pytest.raises(
        pickle.UnpicklingError, match=r"refused numpy _reconstruct with shape \(1099511627776,\): only \(0,\)"
    ):
        safe_pickle_load(io.BytesIO(payload))


def test_unpickler_refuses_shared_reference_bomb_quickly() -> None:
    leaf = (0,) * 1024
    middle = {i: leaf for i in range(256)}  # 256 references to one tuple
    payload = pickle.dumps([middle] * 256, protocol=2)
    assert len(payload) < 4000  # 4 KB holding 67 million references once shared ones are counted apart
    tracemalloc.start()
    try:
        with pytest.raises(
            pickle.UnpicklingError,
            match=r"refused a pickle holding more than 1,000,000 objects \(shared references counted",
        ):
            safe_pickle_load(io.BytesIO(payload))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20  # the walk stops after at most MAX_PICKLE_ITEMS steps


@pytest.mark.parametrize(
    ("obj", "items"),
    [
        ([0] * 10, 10),
        ({i: 0 for i in range(5)}, 10),  # keys and values
        ([[0] * 4] * 2, 10),  # the shared inner list counts twice: 2 + 2 * 4
        ((np.array([[0, 1], [2, 3]], dtype=object), "x"), 6),
        (np.zeros(10**6, np.uint8), 0),  # numeric arrays hold no objects
    ],
)
def test_max_items_counts_every_occurrence(obj: object, items: int) -> None:
    payload = pickle.dumps(obj, protocol=2)
    got = safe_pickle_load(io.BytesIO(payload), max_items=items)
    assert type(got) is type(obj)
    if items:
        with pytest.raises(pickle.UnpicklingError, match=f"more than {items - 1} objects"):
            safe_pickle_load(io.BytesIO(payload), max_items=items - 1)


def test_default_item_limit_leaves_room_for_a_cifar_batch() -> None:
    batch = {
        b"labels": list(range(10)) * 1000,
        b"filenames": [f"img_{i}.png".encode() for i in range(10000)],
        b"data": np.zeros((10000, 3072), np.uint8),
    }
    got = safe_pickle_load(io.BytesIO(pickle.dumps(batch, protocol=2)))
    assert got[b"labels"] == batch[b"labels"] and got[b"data"].shape == (10000, 3072)


def test_load_pickle_names_the_source() -> None:
    with pytest.raises(
        pickle.UnpicklingError, match=r"^radgrad: where\.pkl: radgrad: refused to unpickle global"
    ):
        load_pickle(io.BytesIO(pickle.dumps(print)), "where.pkl")
    with pytest.raises(ValueError, match=r"^radgrad: where\.pkl: not a readable pickle \(EOFError"):
        load_pickle(io.BytesIO(b""), "where.pkl")
    with pytest.raises(pickle.UnpicklingError, match=r"^radgrad: where\.pkl: pickle data was truncated"):
        load_pickle(io.BytesIO(pickle.dumps(list(range(100)))[:-3]), "where.pkl")
