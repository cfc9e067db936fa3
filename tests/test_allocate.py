"""Budget allocation: within the budget, no worse than any uniform setting, and what it predicts is what the model saves."""

import pytest
import torch
from torch import nn

import radgrad
from radgrad.allocate import CANDIDATES
from problems import problem

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _calibration(kind):
    model, x, y = problem(kind)
    radgrad.convert(model, keep=1.0)
    return model, (lambda: nn.functional.cross_entropy(model(x), y)), x


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("budget", [0.45, 0.7])  # tiny layers: scales and masks weigh much
def test_allocation_fits_and_beats_every_uniform_setting(kind, budget):
    model, loss, x = _calibration(kind)
    torch.manual_seed(0)
    a = radgrad.allocate(model, loss, budget, draws=4)
    assert a.saved_bytes <= a.budget_bytes == int(budget * a.exact_bytes)
    fixed = a.saved_bytes - sum(a.table[n][c][0] for n, c in a.configs.items())
    for c in CANDIDATES:  # in-sample: the measurements the choice was made from
        if fixed + sum(row[c][0] for row in a.table.values()) <= a.budget_bytes:
            assert a.total_variance <= sum(row[c][1] for row in a.table.values())
    # applied, the model saves what the allocation predicted, and stays unchanged until then
    assert all(m.sketch.exact for m in model.modules() if hasattr(m, "sketch"))
    a.apply(model)
    assert radgrad.memory.saved_bytes(model, x) == a.saved_bytes


def test_transposed_convolutions_are_allocated_too():
    torch.manual_seed(0)
    model = radgrad.convert(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ConvTranspose2d(4, 3, 3, stride=2)),
                            keep=1.0)
    x = torch.randn(2, 3, 9, 9)
    a = radgrad.allocate(model, lambda: model(x).square().mean(), 0.5, draws=2)
    assert set(a.configs) == {"0", "1"}
    a.apply(model)
    assert radgrad.memory.saved_bytes(model, x) == a.saved_bytes <= a.budget_bytes


def test_a_budget_below_the_least_sketch_is_refused():
    model, loss, _ = _calibration("mlp")
    with pytest.raises(ValueError, match=r"radgrad.allocate: budget 0.001 is below the least these candidates "
                                         r"can save, 0\.\d+ of the exact model's saved bytes"):
        radgrad.allocate(model, loss, 0.001, draws=2)


def test_bad_arguments():
    model, loss, _ = _calibration("mlp")
    with pytest.raises(ValueError, match=r"budget must be a fraction in \(0, 1\], got 1.5"):
        radgrad.allocate(model, loss, 1.5)
    with pytest.raises(ValueError, match="draws must be an int >= 2, got 1"):
        radgrad.allocate(model, loss, 0.5, draws=1)
    with pytest.raises(ValueError, match="has no converted linear or convolution layer"):
        radgrad.allocate(nn.Sequential(nn.ReLU()), lambda: torch.zeros(()), 0.5)
    with pytest.raises(TypeError, match="radgrad.allocate: model must be an nn.Module, got str"):
        radgrad.allocate("model", loss, 0.5)
    with pytest.raises(TypeError, match="radgrad.allocate: loss must be a callable computing a loss from the "
                                        "model, got Tensor"):
        radgrad.allocate(model, loss(), 0.5)
    with pytest.raises(TypeError, match="radgrad.allocate: candidates must be radgrad.SketchConfig objects, got 0.1"):
        radgrad.allocate(model, loss, 0.5, candidates=[radgrad.SketchConfig(), 0.1])
