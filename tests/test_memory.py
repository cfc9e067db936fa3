import copy
import gc
import weakref

import pytest
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


def test_views_of_a_parameter_are_excluded_without_a_model():
    weight = nn.Parameter(torch.randn(5, 4))
    x = torch.randn(3, 5, requires_grad=True)
    with record() as rec:
        out = x @ weight.mT.mT  # matmul saves both operands: x and a view of the parameter
        del out
    assert rec.total == 3 * 5 * 4


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


def test_peak_of_a_hand_computed_step():
    # y = relu(x W^T), loss = y.sum(), plain SGD. W is 500 x 1000 float32: 2,000,000 B.
    # The peak comes in the backward pass, while dL/dW (2,000,000 B) is formed from
    # dL/dy (100 x 500: 200,000 B), with W live: 4,200,000 B, plus the 4-byte loss and
    # the 4-byte seed of its gradient. (relu's output, 200,000 B, is freed once its
    # backward has made dL/dy.) The batch x existed before the step: not counted.
    layer = nn.Linear(1000, 500, bias=False)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(100, 1000)

    def step():
        torch.relu(layer(x)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    record = radgrad.memory.peak(step, layer, optimizer)
    assert record.peak == 4_200_008 and record.at_start == 2_000_000 and record.added == 2_200_008
    assert record.by_kind["parameters"] == 2_000_000 and sum(record.by_kind.values()) == record.peak


class _FixedProjection(nn.Module):
    """``x @ matrix.T`` with the matrix a buffer: what a frozen bias-free linear layer computes."""

    def __init__(self, matrix):
        super().__init__()
        self.register_buffer("matrix", matrix)

    def forward(self, x):
        return x @ self.matrix.T


def test_peak_of_a_model_with_frozen_parameters():
    # fine-tuning a head on a frozen layer: the same tensors live as with that layer's weight a
    # buffer, so the same peak, the frozen weight counted as a parameter and not as a buffer
    torch.manual_seed(0)
    frozen = nn.Linear(300, 200, bias=False).requires_grad_(False)
    head = nn.Linear(200, 10)
    x = torch.randn(50, 300)
    records = []
    for first in (frozen, _FixedProjection(frozen.weight.detach().clone())):
        model = nn.Sequential(first, nn.ReLU(), head)
        optimizer = torch.optim.SGD(head.parameters(), lr=0.1)

        def step():
            model(x).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()

        records.append(radgrad.memory.peak(step, model, optimizer))
    with_parameter, with_buffer = records
    assert with_parameter.peak == with_buffer.peak and with_parameter.at_start == with_buffer.at_start
    assert with_parameter.by_kind["gradients"] == with_buffer.by_kind["gradients"]
    assert with_parameter.by_kind["parameters"] - with_buffer.by_kind["parameters"] == 300 * 200 * 4
    assert with_buffer.by_kind["buffers"] - with_parameter.by_kind["buffers"] == 300 * 200 * 4
    assert not any(p._backward_hooks for p in (*frozen.parameters(), *head.parameters()))  # hooks removed


@pytest.mark.parametrize("config", [radgrad.SketchConfig(0.1), radgrad.SketchConfig(method="quantize")],
                         ids=["sample", "quantize"])
def test_peak_sees_the_saved_bytes_rad_drops(config):
    # Eight 512-wide layers at batch 1000 with plain SGD. The exact step's peak holds every
    # layer's saved input (2 MB each, 16.9 MB saved in all); a RAD step's peak, in the
    # backward pass, holds the sketches (2.2 MB sample, 1.6 MB quantize), the weight
    # gradients made so far (up to 8.4 MB: as many bytes as the weights), an output and an
    # input gradient (2 MB each) and a block of one rebuilt estimate (NOTE [Unpacking in
    # blocks]). Measured: 14.5 MB sample, 17.0 MB quantize, 25.1 MB exact, on top of the
    # weights. Measured after a warm-up step.
    added = {}
    for keep, method in ((1.0, "sample"), (config.keep, config.method)):
        torch.manual_seed(0)
        model = radgrad.convert(nn.Sequential(*(m for _ in range(8) for m in (nn.Linear(512, 512), nn.ReLU()))),
                                keep=keep, method=method)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        x = torch.randn(1000, 512)

        def step():
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()

        step()
        added[method if keep < 1 or method == "quantize" else "exact"] = radgrad.memory.peak(step, model, optimizer).added
    assert added[config.method] < 0.75 * added["exact"]


@pytest.mark.parametrize("module, shape", [(nn.BatchNorm2d(16), (32, 16, 32, 32)), (nn.LayerNorm(64), (32, 16, 16, 64))],
                         ids=["batch_norm", "layer_norm"])
def test_normalization_peak_is_torchs_plus_its_sketches(module, shape):
    # torch's step holds four input-sized tensors at its peak besides the input itself (measured:
    # 4.00 batch norm, 4.03 layer norm, in units of the input's bytes). radgrad's holds the same
    # number, its saved input being two 2-bit sketches instead (an eighth of an input, plus
    # scales): measured 4.13 and 4.16. Rebuilding both estimates at once with out-of-place
    # arithmetic held 8.3, counted with the input.
    x = torch.randn(shape, requires_grad=True)
    peaks = {}
    for converted in (False, True):
        model = nn.Sequential(copy.deepcopy(module))
        if converted:
            radgrad.convert(model, method="quantize")

        def step():
            x.grad = None
            model(x).square().sum().backward()

        step()
        peaks[converted] = radgrad.memory.peak(step, model).peak / (x.numel() * x.element_size())
    assert peaks[False] == pytest.approx(4, abs=0.05)
    assert peaks[True] < peaks[False] + 0.5


def test_peak_rejects_what_it_cannot_track():
    with pytest.raises(TypeError, match="radgrad.memory.peak: owners must be modules or optimizers, got Tensor"):
        radgrad.memory.peak(lambda: None, torch.zeros(1))
    with pytest.raises(TypeError, match="radgrad.memory.peak: step must be a callable running the step, got int"):
        radgrad.memory.peak(3)
    with pytest.raises(TypeError, match="radgrad.memory.record: model must be an nn.Module or None, got str"):
        with record("model"):
            pass


def test_peak_does_not_count_the_dataset_a_batch_is_sliced_from():
    # a minibatch viewed from a dataset tensor, and viewed again inside the step (a flatten, a
    # sketch's rows): only what the step creates counts, as for a batch of its own
    torch.manual_seed(0)
    dataset = torch.randn(1000, 1, 28, 28)
    records = []
    for batch in (dataset[:50], dataset[:50].clone()):
        model = radgrad.convert(nn.Sequential(nn.Flatten(), nn.Linear(784, 30), nn.ReLU(), nn.Linear(30, 10)),
                                keep=0.1)

        def step():
            model(batch).square().sum().backward()

        records.append(radgrad.memory.peak(step, model))
    sliced, own = records
    assert sliced.peak == own.peak and sliced.by_kind == own.by_kind
    assert sliced.peak < dataset.numel() * 4  # torch's MemTracker alone counted the whole dataset here


def test_rebuilding_a_padded_sketch_holds_one_float_copy():
    # rows of 3199 entries fill 4 planes of 800 2-bit codes with one code of padding: the estimate
    # is converted from the codes with the padding cut, never a padded float copy beside it
    x = torch.randn(512, 3199)
    sketch = radgrad.pack(x, radgrad.SketchConfig(method="quantize", bits=2), batch_dims=1)
    estimates = []
    record = radgrad.memory.peak(lambda: estimates.append(radgrad.unpack(sketch)))
    assert estimates[0].is_contiguous()
    one_float_copy, codes_as_bytes = x.numel() * 4, 512 * 4 * 800
    assert one_float_copy <= record.peak <= one_float_copy + codes_as_bytes


def _forward_only(model, x):
    with record(model):
        model(x)


@pytest.mark.parametrize("converted", [False, True], ids=["plain", "converted"])
@pytest.mark.parametrize("ruler", [
    _forward_only,
    measure,
    lambda model, x: radgrad.coverage(model, x),
    lambda model, x: radgrad.memory.peak(lambda: model(x).sum().backward(), model),
], ids=["record", "measure", "coverage", "peak"])
def test_the_rulers_let_go_of_the_model_they_measured(ruler, converted):
    # a measured model must be freed with its last reference, or a loop over models (a benchmark
    # of twenty families) keeps every one. Plain Tanh saves its own output, and a graph never run
    # backward is what record and measure leave behind.
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    if converted:
        model = radgrad.convert(model, keep=0.5)
    weights = [weakref.ref(p) for p in model.parameters()]
    ruler(model, torch.randn(5, 6))
    del model
    gc.collect()
    assert [w() for w in weights] == [None] * len(weights)
