import torch
from torch import nn

import radgrad
from radgrad.memory import OUTSIDE, measure, record


def test_counts_each_saved_byte_once_and_views_by_span():
    data = torch.randn(1000, 10, requires_grad=True)
    with record() as rec:
        batch = data[100:250]  # a slice of a dataset counts as the slice
        out = batch.exp()  # exp saves its output: 150 x 10 float32
        out2 = out * 1.0  # mul by a Python scalar saves nothing
        out3 = out.exp()  # saves `out` again (counted once) and its own output
        del out2, out3
    assert rec.total == 2 * 150 * 10 * 4
    assert rec.by_module == {OUTSIDE: rec.total}


def test_overlapping_views_count_their_union():
    base = torch.randn(100, requires_grad=True).clone()
    with record() as rec:
        a = base[:60].exp() * base[:60]  # mul saves base[:60] (and exp's output)
        b = base[40:].sin()  # sin saves base[40:]
        del a, b
    assert rec.total == 100 * 4 + 60 * 4


def test_parameters_are_excluded_and_modules_named():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    rec = measure(model, torch.randn(5, 4))
    assert rec.by_module == {"0": 5 * 4 * 4, "1": 5 * 8 * 4}
    assert rec.total == sum(rec.by_module.values())


def test_the_ruler_sees_radgrad_sketches_and_bits():
    model = radgrad.convert(nn.Sequential(nn.Linear(100, 80), nn.ReLU(), nn.Linear(80, 2)), keep=0.1)
    rec = measure(model, torch.randn(150, 100))
    # k kept float32 values per row, plus int16 row bases (150) and offsets (k)
    assert rec.by_module == {"0": 150 * 10 * 4 + (150 + 10) * 2, "1": 150 * 80 // 8,
                             "2": 150 * 8 * 4 + (150 + 8) * 2}


def test_paper_models_meet_the_memory_bars_at_batch_150():
    torch.manual_seed(0)
    for make, x, bar in [
        (radgrad.models.mnist_mlp, torch.rand(150, 1, 28, 28), 0.13),
        (radgrad.models.cifar_convnet, torch.rand(150, 3, 32, 32), 0.10),
    ]:
        model = make()
        exact = measure(model, x).total
        radgrad.convert(model, keep=0.1, method="sample")
        rad = measure(model, x)
        assert rad.total <= bar * exact, (make.__name__, rad.total / exact)
        # with RAD, the pooling layers keep nothing and each other layer keeps its share
        assert all(not name or not isinstance(model.get_submodule(name), nn.AvgPool2d) for name in rad.by_module)
