"""radgrad.functional against torch.nn.functional: exact where the contract says exact,
and the weight gradient the exact formula applied to the sketch of the input."""

import copy
import inspect
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import radgrad
from problems import ESTIMATORS, assert_same_up_to_rounding, config_id, options, sketched

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_TORCH_CONV = {1: nn.functional.conv1d, 2: nn.functional.conv2d, 3: nn.functional.conv3d}


def _as_convolved(x, weight, padding, dilation, padding_mode="zeros", module_padding=None):
    """The tensor a RAD convolution sketches, and the zero padding it then convolves it with.

    As torch does: a module with a padding mode other than zeros pads its input
    first (``module_padding``, in F.pad's order) and convolves with no padding;
    an unbatched input gets a batch dimension; ``"same"`` padding that cannot
    be split evenly puts the extra entry on the high side of a dimension.
    """
    n = weight.dim() - 2
    if padding_mode != "zeros":
        x, padding = nn.functional.pad(x, module_padding, mode=padding_mode), 0
    if x.dim() == n + 1:
        x = x.unsqueeze(0)
    if padding == "valid":
        padding = 0
    if padding == "same":
        dilation = [dilation] * n if isinstance(dilation, int) else list(dilation)
        total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
        padding = [t // 2 for t in total]
        x = nn.functional.pad(x, [p for t in reversed(total) for p in (0, t % 2)])
    return x, padding


def _weight_formula(config, x, weight, grad, stride, padding, dilation, groups, **module):
    """torch's weight gradient of the convolution with its input replaced by the sketch estimate
    that the next draw of torch's default generator gives, and that estimate and input."""
    convolved, padding = _as_convolved(x.detach(), weight, padding, dilation, **module)
    estimate = sketched(convolved, config, batch_dims=2)
    out = _TORCH_CONV[weight.dim() - 2](estimate, weight, None, stride, padding, dilation, groups)
    (formula,) = torch.autograd.grad(out, weight, grad.reshape(out.shape))
    return formula, estimate, convolved


@st.composite
def conv_cases(draw):
    dims = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2]))
    c_in, c_out = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 4))
    dilation = draw(st.integers(1, 2))
    stride = draw(st.integers(1, 3))
    padding = draw(st.one_of(st.integers(0, 2), st.sampled_from(["valid", "same"])))
    if padding == "same":
        stride = 1
    mode = draw(st.sampled_from(["zeros", "reflect", "circular", "replicate"]))
    size = draw(st.integers(dilation * (kernel - 1) + 3, 9))
    spatial = (size,) * dims
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                   bias=draw(st.booleans()), padding_mode=mode)
    config = draw(st.sampled_from([*ESTIMATORS, radgrad.SketchConfig(0.05), radgrad.SketchConfig(1.0)]))
    return dims, c_in, c_out, kernel, options, (draw(st.integers(1, 3)), c_in, *spatial), config


@settings(max_examples=60, deadline=None)
@given(conv_cases())
def test_conv_matches_torch(case):
    dims, c_in, c_out, kernel, module_options, shape, config = case
    torch_type = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
    torch.manual_seed(0)
    conv = torch_type(c_in, c_out, kernel, **module_options).double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    params = [x, *conv.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns once about uneven 'same' padding
        out = conv(x)
        grad = torch.randn_like(out)
        expected = torch.autograd.grad(out, params, grad)
    radgrad.convert(conv, **options(config))
    torch.manual_seed(1)
    rad_out = conv(x)
    got = torch.autograd.grad(rad_out, params, grad)
    assert torch.equal(rad_out, out)
    assert torch.equal(got[0], expected[0])  # input gradient
    if module_options["bias"]:
        assert torch.equal(got[2], expected[2])
    if config.exact:
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-10)
    else:
        # the same draw: torch's weight gradient of the estimate of what was convolved
        torch.manual_seed(1)
        formula, _, _ = _weight_formula(conv.sketch, x, conv.weight, grad, conv.stride, conv.padding,
                                        conv.dilation, conv.groups, padding_mode=conv.padding_mode,
                                        module_padding=conv._reversed_padding_repeated_twice)
        assert_same_up_to_rounding(got[1], formula)


@pytest.mark.parametrize("config", ESTIMATORS, ids=config_id)
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("case", ["strided-grouped", "uneven-same-unbatched"])
def test_conv_weight_gradient_is_the_exact_formula_on_the_sketch(case, dims, config):
    # Same draw (same seed): the RAD weight gradient is torch's with the input
    # replaced by unpack(pack(input)), whose unbiasedness test_sketch.py tests.
    torch.manual_seed(0)
    if case == "strided-grouped":
        kernel, options, shape = 3, dict(stride=2, padding=1, dilation=2, groups=2), (2, 4, *(7,) * dims)
    else:  # dilation 1, kernel 2: one padded entry per dimension, on the high side
        kernel, options, shape = 2, dict(stride=1, padding="same", dilation=1, groups=1), (4, *(5,) * dims)
    weight = torch.randn(6, 4 // options["groups"], *(kernel,) * dims, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns once about uneven 'same' padding
        out = _TORCH_CONV[dims](x, weight, bias, **options)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(out, (x, weight, bias), grad)
    torch.manual_seed(1)
    rad_out = radgrad.functional.conv(x, weight, bias, **options, config=config)
    got = torch.autograd.grad(rad_out, (x, weight, bias), grad)
    torch.manual_seed(1)
    formula, estimate, convolved = _weight_formula(config, x, weight, grad, **options)
    assert not torch.equal(estimate, convolved)
    assert torch.equal(rad_out, out)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[2], expected[2])
    assert_same_up_to_rounding(got[1], formula)


_TORCH_CONV_TRANSPOSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


@st.composite
def conv_transpose_cases(draw):
    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2]))
    c_in, c_out = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel, stride, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
    size = draw(st.integers(1, 5 if dims < 3 else 3))
    # padding as large as leaves an output of one position
    padding = draw(st.integers(0, ((size - 1) * stride + dilation * (kernel - 1)) // 2))
    output_size = None
    if draw(st.booleans()):  # one of the sizes torch accepts: the smallest and up to stride - 1 more
        smallest = (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + 1
        output_size = [smallest + draw(st.integers(0, stride - 1))] * dims
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, bias=draw(st.booleans()))
    batch = draw(st.sampled_from([(), (2,)]))  # unbatched or batched, as torch accepts
    config = draw(st.sampled_from([*ESTIMATORS, radgrad.SketchConfig(1.0)]))
    return dims, c_in, c_out, kernel, options, (*batch, c_in, *(size,) * dims), output_size, config


@settings(max_examples=40, deadline=None)
@given(conv_transpose_cases())
def test_conv_transpose_matches_torch(case):
    # Same draw (same seed): the RAD weight gradient is torch's with the input replaced by
    # unpack(pack(input)), whose unbiasedness test_sketch.py tests; the rest is torch's, bitwise.
    dims, c_in, c_out, kernel, module_options, shape, output_size, config = case
    torch.manual_seed(0)
    conv = _TORCH_CONV_TRANSPOSE[dims](c_in, c_out, kernel, **module_options).double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    params = [x, *conv.parameters()]
    out = conv(x, output_size)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(out, params, grad)
    radgrad.convert(conv, **options(config))
    assert isinstance(conv, getattr(radgrad.nn, f"ConvTranspose{dims}d"))
    torch.manual_seed(1)
    rad_out = conv(x, output_size)
    got = torch.autograd.grad(rad_out, params, grad)
    assert torch.equal(rad_out, out)
    assert torch.equal(got[0], expected[0])  # input gradient
    if module_options["bias"]:
        assert torch.equal(got[2], expected[2])
    torch.manual_seed(1)
    batched = x.detach() if len(shape) == dims + 2 else x.detach().unsqueeze(0)
    estimate = batched if config.exact else sketched(batched, config, batch_dims=2)
    output_padding = conv._output_padding(x, output_size, conv.stride, conv.padding, conv.kernel_size, dims,
                                          conv.dilation)
    estimated_out = getattr(nn.functional, f"conv_transpose{dims}d")(
        estimate, conv.weight, None, conv.stride, conv.padding, output_padding, conv.groups, conv.dilation)
    (formula,) = torch.autograd.grad(estimated_out, conv.weight, grad.reshape(estimated_out.shape))
    assert_same_up_to_rounding(got[1], formula)


@st.composite
def pool_cases(draw):
    kind = draw(st.sampled_from(["avg1d", "avg2d", "avg3d", "max1d", "max2d", "max3d"]))
    kernel = draw(st.integers(1, 4))
    stride = draw(st.one_of(st.none(), st.integers(1, 3)))
    padding = draw(st.integers(0, kernel // 2))
    ceil_mode = draw(st.booleans())
    dims = int(kind[-2])
    dilation = draw(st.integers(1, 2)) if kind.startswith("max") else 1
    size = draw(st.integers(dilation * (kernel - 1) + 1, 9 if dims < 3 else 7))
    if kind == "avg1d":
        module = nn.AvgPool1d(kernel, stride, padding, ceil_mode, draw(st.booleans()))
    elif kind.startswith("avg"):
        pool = nn.AvgPool2d if dims == 2 else nn.AvgPool3d
        module = pool(kernel, stride, padding, ceil_mode, draw(st.booleans()), draw(st.sampled_from([None, 3])))
    else:
        pool = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[dims - 1]
        module = pool(kernel, stride, padding, dilation, ceil_mode=ceil_mode)
    batch = draw(st.sampled_from([(), (2,)]))  # unbatched or batched, as torch accepts
    return module, (*batch, 2, *(size,) * dims)


@settings(max_examples=80, deadline=None)
@given(pool_cases())
def test_pooling_and_relu_are_exact(case):
    module, shape = case
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    for layer in (module, nn.ReLU()):
        out = layer(x)
        grad = torch.randn_like(out)
        (expected,) = torch.autograd.grad(out, x, grad)
        radgrad.convert(layer)
        assert type(layer).__module__ == "radgrad.nn"
        rad_out = layer(x)
        (got,) = torch.autograd.grad(rad_out, x, grad)
        assert torch.equal(rad_out, out) and torch.equal(got, expected)


@pytest.mark.parametrize("shape, pool", [((4, 3, 100), nn.MaxPool1d(4)), ((2, 3, 8, 8, 8), nn.MaxPool3d(2))])
def test_max_pool_saves_one_byte_per_output(shape, pool):
    # torch saves the input and int64 indices; radgrad an offset into each window
    x = torch.randn(shape, requires_grad=True)
    radgrad.convert(pool)
    with radgrad.memory.record() as rec:
        out = pool(x)
    assert rec.total == out.numel()


def test_avg_pool3d_saves_nothing():
    # torch saves the input
    x = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
    pool = radgrad.convert(nn.AvgPool3d(2))
    with radgrad.memory.record() as rec:
        pool(x)
    assert rec.total == 0


def test_relu_nan_and_zero_gradients_match_torch():
    x = torch.tensor([-1.0, 0.0, 2.0, float("nan")], requires_grad=True)
    grad = torch.tensor([1.0, 2.0, 3.0, 4.0])
    (expected,) = torch.autograd.grad(torch.relu(x), x, grad)
    (got,) = torch.autograd.grad(radgrad.functional.relu(x), x, grad)
    assert torch.equal(got, expected)


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


_PRELU_CASES = {  # the input, slopes
    "map": (lambda: _randn(4, 3, 5, 5), 3),
    "map-channels-last": (lambda: _randn(4, 3, 5, 5).to(memory_format=torch.channels_last), 3),
    "one-slope": (lambda: _randn(4, 3, 5, 5), 1),
    "rows": (lambda: _randn(6, 5), 5),
    "sequence": (lambda: _randn(4, 3, 7), 3),
    "transposed": (lambda: _randn(4, 7, 3).transpose(1, 2), 3),
    "sliced": (lambda: _randn(4, 3, 8, 8)[:, :, ::2, 1::3], 3),
    "expanded": (lambda: _randn(1, 3, 1, 4).expand(5, 3, 6, 4), 3),
    "empty": (lambda: _randn(0, 3, 4, 4), 3),
}


@pytest.mark.parametrize("config", [radgrad.SketchConfig(0.5), radgrad.SketchConfig(method="quantize", bits=2)],
                         ids=config_id)
@pytest.mark.parametrize("case", _PRELU_CASES)
def test_prelu_input_gradient_is_torchs_and_slope_gradient_the_formula_on_the_sketch(case, config):
    # the slope's gradient is linear in the sketch of min(x, 0), whose unpacking is unbiased
    # (test_sketch): the gradient is that formula applied to the very sketch the op draws
    make, slopes = _PRELU_CASES[case]
    torch.manual_seed(0)
    x = make()
    if x.numel() and 0 not in x.stride():  # an expanded tensor cannot be written
        x[0, 0] = 0.0  # 0 takes the slope, as in torch
    x.requires_grad_()
    w = torch.rand(slopes, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(x.shape, dtype=torch.float64)
    output = nn.functional.prelu(x, w)
    want_x, _ = torch.autograd.grad(output, (x, w), grad)
    torch.manual_seed(1)
    got = radgrad.functional.prelu(x, w, config)
    got_x, got_w = torch.autograd.grad(got, (x, w), grad)
    assert torch.equal(got, output) and torch.equal(got_x, want_x)
    torch.manual_seed(1)
    estimate = sketched(x.detach().clamp(max=0), config, batch_dims=2 if x.dim() > 2 else 1)
    dims = [0, *range(2, x.dim())] if slopes > 1 else list(range(x.dim()))
    assert_same_up_to_rounding(got_w, (grad * estimate).sum(dims).reshape(w.shape))


@pytest.mark.parametrize("equation,spelled,shapes", [
    ("ij,jk->ik", "ij,jk->ik", ((5, 6), (6, 7))),
    ("bhid,bhjd->bhij", "bhid,bhjd->bhij", ((2, 3, 4, 5), (2, 3, 6, 5))),  # attention scores
    ("ibnd,jbnd->bnij", "ibnd,jbnd->bnij", ((4, 2, 3, 5), (6, 2, 3, 5))),  # XLNet's relative attention
    ("ind,nd->in", "ind,nd->in", ((4, 3, 5), (3, 5))),  # a bias per head, broadcast over positions
    ("i j , j k -> k i", "ij,jk->ki", ((5, 6), (6, 7))),
    # torch's readings of an implicit output and an ellipsis
    ("jk,ij", "jk,ij->ik", ((6, 7), (5, 6))),  # the subscripts used once, in alphabetical order
    ("Bj,jb", "Bj,jb->Bb", ((5, 6), (6, 7))),  # capitals first
    ("bij,bjk", "bij,bjk->ik", ((2, 5, 6), (2, 6, 7))),  # b, used twice, summed
    ("...ij,...jk->...ik", "xij,xjk->xik", ((2, 5, 6), (2, 6, 7))),
    ("...ij,jk", "xyij,jk->xyik", ((2, 3, 5, 6), (6, 7))),  # implicit: the ellipsis first
    ("...ij,...jk->ik", "xij,xjk->ik", ((2, 5, 6), (2, 6, 7))),  # left out of the output: summed
    ("i...,...j->...ij", "iy,yj->yij", ((5, 3), (3, 7))),
])
def test_einsum_output_is_torchs_and_gradients_the_formula_on_the_sketches(equation, spelled, shapes):
    # each operand's gradient is the output gradient times the other operand, an einsum linear in
    # that operand's sketch (unbiased: test_sketch); the sketches are drawn a first, then b
    config = radgrad.SketchConfig(method="quantize", bits=2)
    torch.manual_seed(0)
    a, b = (torch.randn(s, dtype=torch.float64, requires_grad=True) * 1 for s in shapes)  # not leaves: sketched
    output = torch.einsum(equation, a, b)
    grad = torch.randn(output.shape, dtype=torch.float64)
    torch.manual_seed(1)
    got = radgrad.functional.einsum(equation, a, b, config)
    got_a, got_b = torch.autograd.grad(got, (a, b), grad)
    assert torch.equal(got, output)
    torch.manual_seed(1)
    estimate_a, estimate_b = (sketched(t.detach(), config, batch_dims=t.dim() - 1) for t in (a, b))
    spec_a, spec_b, spec_out = spelled.replace("->", ",").split(",")
    assert_same_up_to_rounding(got_a, torch.einsum(f"{spec_out},{spec_b}->{spec_a}", grad, estimate_b))
    assert_same_up_to_rounding(got_b, torch.einsum(f"{spec_a},{spec_out}->{spec_b}", estimate_a, grad))


@pytest.mark.parametrize("equation,shapes", [
    ("...ij,...jk->...ik", ((2, 5, 6), (1, 6, 7))),  # the ellipsis broadcast
    ("ii,ij->j", ((5, 5), (5, 7))),  # a diagonal
    ("ijk,jl->il", ((5, 6, 3), (6, 7))),  # k summed within a alone
    ("ij,jk->ik", ((5, 1), (6, 7))),  # j broadcast
])
def test_einsum_runs_torchs_where_its_gradients_are_not_einsums_of_one_kind(equation, shapes):
    a, b = (torch.randn(s, dtype=torch.float64, requires_grad=True) * 1 for s in shapes)
    output = torch.einsum(equation, a, b)
    grad = torch.randn(output.shape, dtype=torch.float64)
    with radgrad.memory.record() as exact:
        want = torch.autograd.grad(torch.einsum(equation, a, b), (a, b), grad)
    with radgrad.memory.record() as rad:
        got = radgrad.functional.einsum(equation, a, b, radgrad.SketchConfig(method="quantize"))
    assert torch.equal(got, output) and rad.total == exact.total
    for g, w in zip(torch.autograd.grad(got, (a, b), grad), want):
        assert torch.equal(g, w)


def test_prelu_saves_a_mask_and_a_sketch_or_only_the_mask():
    x = torch.randn(64, 8, 16, 16, requires_grad=True)
    w = nn.Parameter(torch.full((8,), 0.25))
    config = radgrad.SketchConfig(method="quantize", bits=2)
    with radgrad.memory.record() as plain:
        nn.functional.prelu(x, w)
    with radgrad.memory.record() as rad:
        radgrad.functional.prelu(x, w, config)
    mask = x.numel() // 8
    assert mask < rad.total <= mask + x.numel() // 4 + 64 * 8 * 8 and plain.total == x.numel() * 4
    w.requires_grad_(False)  # a frozen slope: the input gradient needs the mask alone
    with radgrad.memory.record() as frozen:
        out = radgrad.functional.prelu(x, w, config)
    assert frozen.total == mask
    (got,) = torch.autograd.grad(out, x, torch.ones_like(x))
    assert torch.equal(got, torch.where(x > 0, 1.0, 0.25))
    w.requires_grad_(True)  # an input that needs no gradient: the sketch alone
    with radgrad.memory.record() as sketch_only:
        radgrad.functional.prelu(x.detach(), w, config)
    assert sketch_only.total == rad.total - mask
    x64, w64 = x.detach().double(), nn.Parameter(w.detach().double())
    torch.manual_seed(1)
    (got,) = torch.autograd.grad(radgrad.functional.prelu(x64, w64, config).sum(), w64)
    torch.manual_seed(1)
    assert_same_up_to_rounding(got, sketched(x64.clamp(max=0), config, batch_dims=2).sum((0, 2, 3)))


@pytest.mark.parametrize("shape, kernel", [((1, 1, 20, 20), 17), ((1, 1, 8, 8, 8), 7)])  # 289, 343 entries
def test_large_max_pool_windows_use_wider_offsets(shape, kernel):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    torch_pool, rad_pool = ((nn.functional.max_pool2d, radgrad.functional.max_pool2d) if len(shape) == 4 else
                            (nn.functional.max_pool3d, radgrad.functional.max_pool3d))
    out = torch_pool(x, kernel, 1)
    grad = torch.randn_like(out)
    (expected,) = torch.autograd.grad(out, x, grad)
    with radgrad.memory.record() as rec:
        rad_out = rad_pool(x, kernel, 1)
    assert rec.total == 2 * out.numel()  # int16 offsets
    (got,) = torch.autograd.grad(rad_out, x, grad)
    assert torch.equal(got, expected)


# planes of 3 x width and 2 x 3 x width entries: below and above 2**21
@pytest.mark.parametrize("shape", [(1, 1, 3, 699_049), (1, 1, 3, 699_051), (1, 1, 2, 3, 349_525), (1, 1, 2, 3, 349_526)])
def test_max_pool_offsets_are_exact_on_wide_planes(shape):
    # plane indices are divided in float32, or float64 for planes of 2**21 entries and
    # more (NOTE [Compact max-pool indices]): every position, windows dilated and
    # padded, ceil mode, up to the largest index float32 is used for
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    if len(shape) == 4:
        torch_pool, rad_pool = nn.functional.max_pool2d, radgrad.functional.max_pool2d
        options = dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 1), dilation=(2, 3), ceil_mode=True)
    else:
        torch_pool, rad_pool = nn.functional.max_pool3d, radgrad.functional.max_pool3d
        options = dict(kernel_size=(2, 2, 3), stride=(1, 1, 2), padding=(1, 1, 1), dilation=(1, 2, 3), ceil_mode=True)
    out = torch_pool(x, **options)
    grad = torch.randn_like(out)
    (expected,) = torch.autograd.grad(out, x, grad)
    (got,) = torch.autograd.grad(rad_pool(x, **options), x, grad)
    assert torch.equal(got, expected)


def test_functional_linear_matches_torch_when_not_randomized():
    x, w = torch.randn(3, 4), torch.randn(2, 4)
    assert torch.equal(radgrad.functional.linear(x, w), nn.functional.linear(x, w))


_F = radgrad.functional
_X, _W4, _MAP = torch.randn(3, 4), torch.randn(4, 4), torch.randn(2, 3, 5, 5)
_CONFIG_TAKERS = {  # every public function with a config, called with what it takes but the config
    "linear": lambda c: _F.linear(_X, _W4, config=c),
    "conv": lambda c: _F.conv(_MAP, torch.randn(2, 3, 3, 3), config=c),
    "conv_transpose": lambda c: _F.conv_transpose(_MAP, torch.randn(3, 2, 3, 3), config=c),
    "elementwise": lambda c: _F.elementwise(torch.tanh, _X, config=c),
    "layer_norm": lambda c: _F.layer_norm(_X, (4,), config=c),
    "rms_norm": lambda c: _F.rms_norm(_X, (4,), config=c),
    "batch_norm": lambda c: _F.batch_norm(_MAP, None, None, training=True, config=c),
    "group_norm": lambda c: _F.group_norm(_MAP, 1, config=c),
    "instance_norm": lambda c: _F.instance_norm(_MAP, config=c),
    "scaled_dot_product_attention": lambda c: _F.scaled_dot_product_attention(_MAP, _MAP, _MAP, config=c),
    "multi_head_attention_forward": lambda c: _F.multi_head_attention_forward(
        _X[:, None], _X[:, None], _X[:, None], 4, 2, torch.randn(12, 4), None, None, None, False, 0.0, _W4, None,
        config=c),
    "matmul": lambda c: _F.matmul(_X, _W4, config=c),
    "baddbmm": lambda c: _F.baddbmm(_MAP[0], _MAP[0], _MAP[0], config=c),
    "mul": lambda c: _F.mul(_X, _X, config=c),
    "softmax": lambda c: _F.softmax(_X, -1, config=c),
    "log_softmax": lambda c: _F.log_softmax(_X, -1, config=c),
    "cross_entropy": lambda c: _F.cross_entropy(_X, torch.tensor([0, 1, 2]), config=c),
    "recurrence": lambda c: _F.recurrence(torch.randn(2, 3, 4), torch.zeros(3, 4), _W4, config=c),
    "gru_recurrence": lambda c: _F.gru_recurrence(torch.randn(2, 3, 12), torch.zeros(3, 4),
                                                  torch.randn(12, 4, requires_grad=True), config=c),
    "lstm_recurrence": lambda c: _F.lstm_recurrence(torch.randn(2, 3, 16), torch.zeros(3, 4), torch.zeros(3, 4),
                                                    torch.randn(16, 4, requires_grad=True), config=c),
    "prelu": lambda c: _F.prelu(_MAP, torch.rand(3), config=c),
    "einsum": lambda c: _F.einsum("ij,jk->ik", _X, _W4, config=c),
}


@pytest.mark.parametrize("name", _CONFIG_TAKERS)
def test_a_config_that_is_not_a_sketch_config_is_an_error(name):
    _CONFIG_TAKERS[name](radgrad.SketchConfig(method="quantize"))  # the call is right but for the config
    with pytest.raises(TypeError, match=rf"radgrad.functional.{name}: config must be a radgrad.SketchConfig, "
                                        "got float"):
        _CONFIG_TAKERS[name](0.1)


def test_every_function_with_a_config_is_checked():
    takers = {n for n in _F.__all__ if "config" in inspect.signature(getattr(_F, n)).parameters}
    assert takers == set(_CONFIG_TAKERS)


def test_strided_same_padding_is_an_error():
    w = torch.randn(2, 1, 3, requires_grad=True)
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        radgrad.functional.conv(torch.randn(1, 1, 8), w, stride=2, padding="same")


@pytest.mark.parametrize("config", ESTIMATORS, ids=config_id)
@pytest.mark.parametrize("kind", ["linear", "conv", "conv-channels-last"])
def test_gradients_from_blocks_of_rows_equal_one_block(kind, config, monkeypatch):
    # NOTE [Unpacking in blocks]: the same draw, rebuilt in blocks of 10 entries
    # (several rows, or examples, each) or all at once, gives the same gradients.
    torch.manual_seed(0)
    if kind == "linear":
        x, weight = torch.randn(5, 3, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
        op = lambda x, w, b: radgrad.functional.linear(x, w, b, config)  # noqa: E731
    else:
        x, weight = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randn(3, 2, 3, 3, dtype=torch.float64)
        if kind == "conv-channels-last":
            x = x.to(memory_format=torch.channels_last)
        op = lambda x, w, b: radgrad.functional.conv(x, w, b, padding=1, config=config)  # noqa: E731
    leaves = [x.requires_grad_(), weight.requires_grad_(), torch.randn(weight.shape[0], dtype=torch.float64,
                                                                       requires_grad=True)]
    grads = []
    for block in (2**18, 10):
        monkeypatch.setattr(radgrad.functional._base, "_BLOCK", block)
        torch.manual_seed(1)
        out = op(*leaves)
        grads.append(torch.autograd.grad(out, leaves, torch.linspace(-1, 1, out.numel()).view(out.shape)))
    for blocked, whole in zip(grads[1], grads[0]):
        assert_same_up_to_rounding(blocked, whole)


def test_backward_gets_no_zero_gradients_for_packed_tensors(monkeypatch):
    # NOTE [No zero gradients for packed tensors]: by default autograd would hand every backward a
    # zero tensor for each packed (non-differentiable) output, allocated and filled for nothing
    from radgrad.functional._base import _RADFunction

    received = []
    for cls in _RADFunction.__subclasses__():
        def backward(ctx, grad, *rest, _original=cls._classic.backward):
            received.extend(rest)
            return _original(ctx, grad, *rest)
        monkeypatch.setattr(cls._classic, "backward", staticmethod(backward))
    torch.manual_seed(0)
    model = radgrad.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                          nn.Linear(4 * 6 * 6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 2)),
                            method="quantize")
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(1)
    model(x).sum().backward()
    assert len(received) > 10 and all(g is None for g in received)
    grads = [p.grad.clone() for p in model.parameters()]
    received.clear()
    for cls in _RADFunction.__subclasses__():  # torch's default, which the check must see
        monkeypatch.setattr(cls, "_materialize_grads", True)
    model.zero_grad()
    torch.manual_seed(1)
    model(x).sum().backward()
    assert any(isinstance(g, torch.Tensor) for g in received)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


class _NoGradient(torch.autograd.Function):
    """The identity, whose backward returns None: no gradient reaches what precedes it."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


def test_an_op_that_returns_no_gradient_stops_radgrad_ops_as_it_stops_torch():
    # with zero gradients no longer materialized (NOTE [No zero gradients for packed tensors]),
    # a radgrad op can receive None for its output and must pass no gradient on
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4),
                          nn.LayerNorm(4), nn.GELU())
    converted = radgrad.convert(copy.deepcopy(model), method="quantize")
    x = torch.randn(2, 2, 4, 4)
    for m in (model, converted):
        (_NoGradient.apply(m(x)).sum() + sum(p.sum() for p in m.parameters())).backward()
    for p, q in zip(model.parameters(), converted.parameters()):
        assert torch.equal(p.grad, q.grad) and torch.equal(q.grad, torch.ones_like(q))


def _ops_on_batches():
    """RAD ops on batched inputs, each a function of its inputs' tensors (float64) with its own config."""
    config = radgrad.SketchConfig(method="quantize")
    F, RF = nn.functional, radgrad.functional
    return {
        "linear": ([(2, 5, 8), (4, 8), (4,)], lambda x, w, b: RF.linear(x, w, b, config)),
        "matmul": ([(2, 5, 8), (2, 8, 3)], lambda a, b: RF.matmul(a, b, config=config)),
        "attention": ([(2, 3, 5, 4)] * 3, lambda q, k, v: RF.scaled_dot_product_attention(q, k, v, config=config)),
        "layer_norm": ([(2, 5, 8), (8,), (8,)], lambda x, w, b: RF.layer_norm(x, [8], w, b, config=config)),
        "softmax": ([(2, 5, 8)], lambda x: RF.softmax(x, -1, config=config)),
        "gelu": ([(2, 5, 8)], lambda x: RF.elementwise(F.gelu, x, config=config)),
        "conv1d": ([(2, 3, 9), (4, 3, 3)], lambda x, w: RF.conv(x, w, None, config=config)),
        "relu": ([(2, 5, 8)], RF.relu),
        "max_pool1d": ([(2, 5, 8)], lambda x: RF.max_pool1d(x, 2)),
        "avg_pool1d": ([(2, 5, 8)], lambda x: RF.avg_pool1d(x, 2)),
        "group_norm": ([(2, 4, 6), (4,), (4,)], lambda x, w, b: RF.group_norm(x, 2, w, b, config=config)),
    }


@pytest.mark.parametrize("op", list(_ops_on_batches()))
def test_outputs_can_be_modified_in_place(op):
    # as torch's own outputs can (NOTE [Outputs are not views]): a model's h[mask] = e or h += x
    shapes, fn = _ops_on_batches()[op]
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]

    def grads(in_place):
        torch.manual_seed(1)
        out = fn(*inputs)
        mask = torch.arange(out.shape[-1]) % 3 == 0
        out = out.masked_fill_(mask, 0.5).mul_(2) if in_place else out.masked_fill(mask, 0.5) * 2
        return torch.autograd.grad(out.square().sum(), inputs)

    for got, want in zip(grads(True), grads(False)):
        assert torch.equal(got, want)
