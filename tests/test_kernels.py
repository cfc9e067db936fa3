"""The compiled CPU kernels and their pure-torch twins give the very same bits."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radgrad import kernels

pytestmark = pytest.mark.skipif(not kernels.compiled(), reason="the CPU kernels could not be built here")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
_SAME_SIZE_INT = {torch.float32: torch.int32, torch.float64: torch.int64,
                  torch.bfloat16: torch.int16, torch.float16: torch.int16}


def same_bits(a, b):
    """Bitwise equality, NaNs included."""
    return a.dtype == b.dtype and torch.equal(a.view(_SAME_SIZE_INT[a.dtype]), b.view(_SAME_SIZE_INT[b.dtype]))


@pytest.fixture
def twins(monkeypatch):
    """Run a kernels function through its pure-torch twin."""
    def run(fn, *args):
        monkeypatch.setattr(kernels, "_compiled", False)
        try:
            return fn(*args)
        finally:
            monkeypatch.setattr(kernels, "_compiled", True)
    return run


# d = 2^31 + 1 rejects about half of the first draws, so the redraw path runs too.
@pytest.mark.parametrize("d", [1, 7, 784, 2**31 + 1])
@pytest.mark.parametrize("per_example", [True, False])
def test_indices_agree_and_stay_in_range(twins, d, per_example):
    cpu = torch.device("cpu")
    compiled = kernels.sample_indices(40, 25, d, per_example, 2**62 + 12345, cpu)
    twin = twins(kernels.sample_indices, 40, 25, d, per_example, 2**62 + 12345, cpu)
    assert torch.equal(compiled, twin)
    assert compiled.shape == ((40, 25) if per_example else (25,))
    assert 0 <= compiled.min() and compiled.max() < d


def test_indices_are_uniform():
    # chi-square over d = 10 cells from 10^5 draws: the statistic has 9 degrees of
    # freedom, mean 9 and standard deviation sqrt(18); 40 is beyond 7 standard deviations.
    idx = kernels.sample_indices(1000, 100, 10, True, 7, torch.device("cpu"))
    counts = torch.bincount(idx.flatten(), minlength=10).double()
    expected = idx.numel() / 10
    assert ((counts - expected) ** 2 / expected).sum() < 40


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 20), d=st.integers(1, 50), keep=st.floats(0.01, 1.0),
       per_example=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**63 - 1))
def test_pack_and_unpack_agree_bitwise(rows, d, keep, per_example, dtype, seed):
    k = max(1, round(keep * d))
    x = torch.randn(rows, d, generator=torch.Generator().manual_seed(seed % 2**32)).to(dtype)
    values = kernels.sample_pack(x, k, per_example, seed)
    est = kernels.sample_unpack(values, d, per_example, seed, d / k)
    kernels._compiled = False
    try:
        assert same_bits(kernels.sample_pack(x, k, per_example, seed), values)
        assert same_bits(kernels.sample_unpack(values, d, per_example, seed, d / k), est)
    finally:
        kernels._compiled = True


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_masks_agree_with_torch_and_numpy(twins, dtype):
    x = torch.tensor([0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), -float("inf"), 2.0, 0.0, 3.0, -2.0],
                     dtype=dtype)
    packed = kernels.pack_nonzero(x)
    assert torch.equal(packed, twins(kernels.pack_nonzero, x))
    assert packed.tolist() == np.packbits((x != 0).numpy(), bitorder="little").tolist()
    assert torch.equal(kernels.unpack_mask(packed, x.shape), x != 0)
    grad = torch.tensor([1.0, 2.0, float("nan"), 4.0, 5.0, float("nan"), 7.0, 8.0, float("nan"), 10.0, 11.0],
                        dtype=dtype)
    expected = torch.ops.aten.threshold_backward(grad, (x != 0).to(dtype), 0)
    assert same_bits(kernels.masked_grad(grad, packed), expected)
    assert same_bits(twins(kernels.masked_grad, grad, packed), expected)


@given(st.integers(1, 200), st.integers(0, 2**32 - 1))
def test_the_numpy_and_integer_multiply_layouts_agree(n, seed):
    # CPU twins use numpy's packbits, other devices integer multiplies: the same bytes.
    flat = (torch.rand(n, generator=torch.Generator().manual_seed(seed)) > 0.5).view(torch.uint8)
    packed = kernels.pack_nonzero(flat.view(torch.bool).float())
    assert torch.equal(kernels._pack_by_multiply(flat), packed)
    assert torch.equal(kernels._unpack_by_multiply(packed, n), flat)


def test_draw_seed_is_torchs_randint():
    torch.manual_seed(5)
    compiled = kernels.draw_seed(torch.device("cpu"))
    torch.manual_seed(5)
    assert compiled == torch.randint(2**62, (1,)).item()


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(kernels, "_compiled", None)
    monkeypatch.setenv("RADGRAD_KERNELS", "1")
    import torch.utils.cpp_extension as cpp_extension

    def broken(**kwargs):
        raise OSError("no compiler")
    monkeypatch.setattr(cpp_extension, "load", broken)
    with pytest.warns(RuntimeWarning, match="could not build the CPU kernels .*no compiler"):
        assert kernels.compiled() is False
    assert kernels.compiled() is False  # decided once


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_example", [True, False])
@pytest.mark.parametrize("shape", [(6, 10), (2, 3, 10)])
@pytest.mark.parametrize("bias", [True, False])
def test_the_compiled_linear_is_the_python_function_bitwise(monkeypatch, dtype, per_example, shape, bias):
    from radgrad import functional as RF
    from radgrad.sketch import SketchConfig

    generator = torch.Generator().manual_seed(1)
    x, w, g = (torch.randn(s, generator=generator).to(dtype) for s in (shape, (4, 10), (*shape[:-1], 4)))
    b = torch.randn(4, generator=generator).to(dtype) if bias else None
    config = SketchConfig(0.3, "sample", per_example)

    def run():
        torch.manual_seed(0)
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
        y = RF.linear(*leaves, config)
        y.backward(g)
        return y.grad_fn.name(), [y.detach()] + [t.grad for t in leaves if t is not None]

    name, compiled = run()
    monkeypatch.setattr(kernels, "_compiled", False)
    twin_name, twin = run()
    assert "SampledLinear" in name and twin_name == "_LinearBackward"
    assert all(same_bits(a, b) for a, b in zip(compiled, twin))


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_compiled_relu_is_the_python_function_bitwise(monkeypatch, dtype):
    from radgrad import functional as RF

    x = torch.tensor([[0.0, -0.0, 1.5, -1.0, float("nan")], [2.0, -3.0, 0.5, float("inf"), -float("inf")]], dtype=dtype)
    g = torch.tensor([[1.0, float("nan"), 3.0, 4.0, 5.0], [6.0, float("nan"), 8.0, 9.0, 10.0]], dtype=dtype)

    def run():
        leaf = x.clone().requires_grad_()
        y = RF.relu(leaf)
        y.backward(g)
        return y.grad_fn.name(), [y.detach(), leaf.grad]

    name, compiled = run()
    monkeypatch.setattr(kernels, "_compiled", False)
    twin_name, twin = run()
    assert "MaskedReLU" in name and twin_name == "_ReLUBackward"
    assert all(same_bits(a, b) for a, b in zip(compiled, twin))


def test_the_compiled_relu_has_an_exact_second_derivative():
    from radgrad import functional as RF

    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 7, dtype=torch.float64)
    for relu in (RF.relu, torch.relu):
        (g,) = torch.autograd.grad((relu(x @ w) ** 2).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), x)
        if relu is RF.relu:
            ours = h
    torch.testing.assert_close(ours, h, rtol=0, atol=0)
