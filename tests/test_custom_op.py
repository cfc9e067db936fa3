"""The worked custom-op example: exact at keep=1, unbiased below, visible to the ruler."""

import importlib.util
from pathlib import Path

import torch

import radgrad
from problems import assert_unbiased

_spec = importlib.util.spec_from_file_location(
    "custom_op", Path(__file__).resolve().parents[1] / "examples" / "custom_op.py")
custom_op = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(custom_op)


def _problem():
    torch.manual_seed(0)
    a = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 10, 4, dtype=torch.float64, requires_grad=True)
    return a, b, torch.randn(2, 3, 4, dtype=torch.float64)


def test_exact_at_keep_one():
    a, b, g = _problem()
    expected = torch.autograd.grad(torch.bmm(a, b), (a, b), g)
    got = torch.autograd.grad(custom_op.sketched_bmm(a, b, keep=1.0), (a, b), g)
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


def test_unbiased_and_input_gradient_exact():
    a, b, g = _problem()
    exact_a, exact_b = torch.autograd.grad(torch.bmm(a, b), (a, b), g)
    samples = []
    for _ in range(4000):
        grad_a, grad_b = torch.autograd.grad(custom_op.sketched_bmm(a, b, keep=0.3), (a, b), g)
        assert torch.equal(grad_a, exact_a)
        samples.append(grad_b.reshape(-1))
    assert_unbiased(torch.stack(samples), exact_b.reshape(-1))


def test_the_ruler_sees_the_sketch():
    a, b = torch.randn(2, 3, 100), torch.randn(2, 100, 4, requires_grad=True)
    with radgrad.memory.record() as rec:
        y = custom_op.sketched_bmm(a, b, keep=0.1)
    # 10 of 100 float32 values for each of the 2 x 3 rows, int16 row bases and offsets
    assert rec.total == 2 * 3 * 10 * 4 + (6 + 10) * 2 and y.shape == (2, 3, 4)
