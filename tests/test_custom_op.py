"""The worked custom-op example: exact at keep=1, below it the exact gradient formula
applied to the sketch (unbiased, as test_sketch.py tests), visible to the ruler."""

import pytest
import torch

import radgrad
from problems import ESTIMATORS, assert_same_up_to_rounding, config_id, load_example, sketched

pytestmark = pytest.mark.usefixtures("one_torch_thread")

custom_op = load_example("custom_op")


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


@pytest.mark.parametrize("config", ESTIMATORS, ids=config_id)
def test_gradient_is_the_exact_formula_on_the_sketch_and_input_gradient_exact(config):
    # Same draw (same seed): dL/db is torch's bmm gradient with a replaced by
    # unpack(pack(a)), an unbiased estimate (test_sketch.py); dL/da is torch's.
    a, b, g = _problem()
    exact_a, _ = torch.autograd.grad(torch.bmm(a, b), (a, b), g)
    torch.manual_seed(1)
    out = custom_op.SketchedBmm.apply(a, b, config)
    grad_a, grad_b = torch.autograd.grad(out, (a, b), g)
    torch.manual_seed(1)
    estimate = sketched(a.detach(), config, batch_dims=2)
    (formula,) = torch.autograd.grad(torch.bmm(estimate, b), b, g)
    assert not torch.equal(estimate, a)
    assert torch.equal(out, torch.bmm(a, b))
    assert torch.equal(grad_a, exact_a)
    assert_same_up_to_rounding(grad_b, formula)
    if config == radgrad.SketchConfig(0.3):  # the public function: the same op
        torch.manual_seed(1)
        assert torch.equal(torch.autograd.grad(custom_op.sketched_bmm(a, b, keep=0.3), b, g)[0], grad_b)


def test_the_ruler_sees_the_sketch():
    a, b = torch.randn(2, 3, 100), torch.randn(2, 100, 4, requires_grad=True)
    with radgrad.memory.record() as rec:
        y = custom_op.sketched_bmm(a, b, keep=0.1)
    # 10 of 100 float32 values for each of the 2 x 3 rows, int16 row bases and offsets
    assert rec.total == 2 * 3 * 10 * 4 + (6 + 10) * 2 and y.shape == (2, 3, 4)
