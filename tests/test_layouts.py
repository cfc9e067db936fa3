"""Every op on any memory layout: permuted, sliced, expanded, channels_last and empty tensors.

Exact parts are compared with torch bitwise (float64); estimated parts are
compared with the same op on a contiguous copy under the same draw, which
makes them the very estimate whose unbiasedness tests/test_sketch.py checks.
"""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import radgrad
from radgrad import functional as RF
from radgrad.sketch import SketchConfig, pack, unpack
from problems import ESTIMATORS, channels_last_convnet

CONFIGS = st.sampled_from([SketchConfig(1.0), *ESTIMATORS])

LAYOUTS = ["contiguous", "permuted", "sliced", "expanded"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def strided(shape, layout, seed, order=None):
    """A float64 leaf tensor and a view of it with logical ``shape`` in the given layout."""
    if layout == "channels_last":  # a feature map (N, C, *positions) stored as (N, *positions, C)
        return strided(shape, "permuted", seed, order=[0, *range(2, len(shape)), 1])
    g = torch.Generator().manual_seed(seed)
    n = len(shape)
    if layout == "permuted" and n > 1:
        order = order or list(reversed(range(n)))
        leaf = torch.randn([shape[i] for i in order], generator=g, dtype=torch.float64)
        inverse = sorted(range(n), key=lambda i: order[i])
        return leaf, lambda t: t.permute(inverse)
    if layout == "sliced":
        leaf = torch.randn([2 * s + 1 for s in shape], generator=g, dtype=torch.float64)
        return leaf, lambda t: t[tuple(slice(1, 2 * s + 1, 2) for s in shape)]
    if layout == "expanded" and n > 0:
        leaf = torch.randn([1, *shape[1:]], generator=g, dtype=torch.float64)
        return leaf, lambda t: t.expand(shape)
    leaf = torch.randn(shape, generator=g, dtype=torch.float64)
    return leaf, lambda t: t


def grads_of(fn, leaf, view, params=(), seed=0):
    leaf = leaf.detach().requires_grad_()
    params = [p.detach().requires_grad_() for p in params]
    torch.manual_seed(seed)
    out = fn(view(leaf), *params)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad(out, [leaf, *params], upstream)
    return [out.detach(), *grads]  # output, input gradient, parameter gradients


def assert_same(a, b, exact=True):
    for x, y in zip(a, b):
        if exact:
            assert torch.equal(x, y), (x - y).abs().max()
        else:
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-13)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=4), layout=st.sampled_from(LAYOUTS),
       seed=st.integers(0, 2**31))
def test_relu_matches_torch_bitwise(shape, layout, seed):
    leaf, view = strided(shape, layout, seed)
    leaf.view(-1)[::3] = torch.nan  # NaN entries too (a NaN input passes its gradient)
    want = grads_of(torch.relu, leaf, view)
    got = grads_of(RF.relu, leaf, view)
    assert torch.equal(got[0].nan_to_num(7.0), want[0].nan_to_num(7.0))
    assert_same(got[1:], want[1:])


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4), layout=st.sampled_from(LAYOUTS + ["channels_last"]),
       chunk=st.sampled_from([8, 16, 40]), grad_like_output=st.booleans(), seed=st.integers(0, 2**31))
def test_relu_masks_in_chunks_match_torch_bitwise(shape, layout, chunk, grad_like_output, seed):
    # NOTE [Masks in chunks]: a mask of more than _CHUNK entries is packed and applied a chunk at a
    # time; small chunks make most cases here cross chunk boundaries, whole bytes or not
    if layout == "channels_last" and len(shape) < 3:
        layout = "permuted"
    leaf, view = strided(shape, layout, seed)
    leaf.view(-1)[::3] = torch.nan
    x = view(leaf).detach().requires_grad_()
    out = RF.relu(x)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    if grad_like_output:  # in the mask's own layout: the chunked path
        upstream = torch.empty_like(out).copy_(upstream)
    with mock.patch.object(radgrad.bits, "_CHUNK", chunk):
        packed = radgrad.bits.pack(out.detach())  # what RF.relu saves
        mask = radgrad.bits.unpack(packed)
        got = radgrad.bits.masked_grad(upstream, packed)
    whole = radgrad.bits.pack(out.detach())
    assert torch.equal(packed.data, whole.data) and packed.order == whole.order
    assert torch.equal(mask.bool(), out.detach() != 0)
    want = torch.autograd.grad(torch.relu(x), x, upstream)[0]
    assert torch.equal(got, want)
    if grad_like_output:  # in the layout of the gradient (and mask) it was given
        assert [stride for n, stride in zip(got.shape, got.stride()) if n > 1] == \
            [stride for n, stride in zip(upstream.shape, upstream.stride()) if n > 1]


@settings(max_examples=40, deadline=None)
@given(layout=st.sampled_from(LAYOUTS + ["channels_last"]), dims=st.sampled_from([2, 3]), batch=st.integers(0, 3),
       size=st.integers(2, 6), kernel=st.integers(1, 2), stride=st.integers(1, 2), seed=st.integers(0, 2**31))
def test_pooling_matches_torch(layout, dims, batch, size, kernel, stride, seed):
    shape = [batch, 2, size, size + 1, size + 2][:dims + 2]
    leaf, view = strided(shape, layout, seed)
    ops = ([(RF.avg_pool2d, F.avg_pool2d), (RF.max_pool2d, F.max_pool2d)] if dims == 2 else
           [(RF.avg_pool3d, F.avg_pool3d), (RF.max_pool3d, F.max_pool3d)])
    for rad, torch_op in ops:
        want = grads_of(lambda x: torch_op(x, kernel, stride), leaf, view)
        got = grads_of(lambda x: rad(x, kernel, stride), leaf, view)
        assert_same(got, want, exact=torch_op in (F.avg_pool2d, F.avg_pool3d))
        assert_same(got[:1], want[:1])  # forward values bitwise
    if dims == 3:
        return
    want = grads_of(lambda x: F.avg_pool1d(x.flatten(1, 2), kernel, stride), leaf, view)
    got = grads_of(lambda x: RF.avg_pool1d(x.flatten(1, 2), kernel, stride), leaf, view)
    assert_same(got, want)


@settings(max_examples=40, deadline=None)
@given(layout=st.sampled_from(LAYOUTS), rows=st.integers(0, 4), features=st.integers(0, 9),
       config=CONFIGS, seed=st.integers(0, 2**31))
def test_linear_on_any_layout(layout, rows, features, config, seed):
    leaf, view = strided([rows, 3, features], layout, seed)
    weight = torch.randn(4, features, dtype=torch.float64)
    bias = torch.randn(4, dtype=torch.float64)
    got = grads_of(lambda x, w, b: RF.linear(x, w, b, config), leaf, view, (weight, bias))
    if config.exact:
        want = grads_of(F.linear, leaf, view, (weight, bias))
        assert_same(got, want, exact=False)
    # the same draw on a contiguous copy: the same estimate
    contiguous = grads_of(lambda x, w, b: RF.linear(x.contiguous(), w, b, config), leaf, view, (weight, bias))
    assert_same(got, contiguous, exact=False)
    # output, input and bias gradients are exact whatever keep is
    want = grads_of(F.linear, leaf, view, (weight, bias))
    assert_same([got[0], got[1], got[3]], [want[0], want[1], want[3]], exact=False)


@settings(max_examples=30, deadline=None)
@given(layout=st.sampled_from(LAYOUTS + ["channels_last"]), batch=st.integers(0, 3), size=st.integers(3, 6),
       config=CONFIGS, seed=st.integers(0, 2**31))
# quantized codes of a channels_last sketch were packed in its column-major layout, which unpacking
# could not view as rows ("view size is not compatible with input tensor's size and stride")
@example(layout="channels_last", batch=1, size=4, config=SketchConfig(method="quantize", bits=2), seed=0)
def test_conv_on_any_layout(layout, batch, size, config, seed):
    shape = [batch, 2, size, size]
    leaf, view = strided(shape, layout, seed)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    bias = torch.randn(3, dtype=torch.float64)
    got = grads_of(lambda x, w, b: RF.conv(x, w, b, padding=1, config=config), leaf, view, (weight, bias))
    contiguous = grads_of(lambda x, w, b: RF.conv(x.contiguous(), w, b, padding=1, config=config),
                          leaf, view, (weight, bias))
    assert_same(got, contiguous, exact=False)
    want = grads_of(lambda x, w, b: F.conv2d(x, w, b, padding=1), leaf, view, (weight, bias))
    # output, input and bias gradients are exact whatever keep is; the weight's at keep 1
    exact = [0, 1, 2, 3] if config.exact else [0, 1, 3]
    assert_same([got[i] for i in exact], [want[i] for i in exact], exact=False)


@settings(max_examples=30, deadline=None)
@given(layout=st.sampled_from(LAYOUTS + ["channels_last"]), batch=st.integers(0, 3), size=st.integers(1, 5),
       op=st.sampled_from(["group_norm", "instance_norm", "conv_transpose"]), config=CONFIGS,
       seed=st.integers(0, 2**31))
def test_group_norms_and_transposed_conv_on_any_layout(layout, batch, size, op, config, seed):
    shape = [batch, 4, size, size + 1]
    leaf, view = strided(shape, layout, seed)
    if op == "conv_transpose":
        weight, bias = torch.randn(4, 3, 3, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
        rad = lambda x, w, b: RF.conv_transpose(x, w, b, stride=2, groups=2, config=config)  # noqa: E731
        plain = lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2, groups=2)  # noqa: E731
    else:
        weight, bias = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
        rad, plain = {
            "group_norm": (lambda x, w, b: RF.group_norm(x, 2, w, b, 1e-5, config),
                           lambda x, w, b: F.group_norm(x, 2, w, b, 1e-5)),
            "instance_norm": (lambda x, w, b: RF.instance_norm(x, None, None, w, b, True, 0.1, 1e-5, config),
                              lambda x, w, b: F.instance_norm(x, None, None, w, b, True, 0.1, 1e-5)),
        }[op]
    if op == "instance_norm" and batch == 0:  # torch's instance norm refuses an empty batch; so does radgrad's
        for fn in (plain, rad):
            with pytest.raises(IndexError, match="out of range"):
                grads_of(fn, leaf, view, (weight, bias))
        return
    got = grads_of(rad, leaf, view, (weight, bias))
    contiguous = grads_of(lambda x, w, b: rad(x.contiguous(), w, b), leaf, view, (weight, bias))
    assert_same(got, contiguous, exact=False)
    want = grads_of(plain, leaf, view, (weight, bias))
    # the output and the bias gradient are exact; the convolution's input gradient too; all at keep 1
    exact = [0, 1, 2, 3] if config.exact else [0, 1, 3] if op == "conv_transpose" else [0, 3]
    assert_same([got[i] for i in exact], [want[i] for i in exact], exact=False)


def _dense_like(t):
    """A contiguous copy of ``t``, transposed in memory where ``t`` is (a key read as ``k.mT``)."""
    if t.dim() >= 2 and t.stride(-1) != 1 and t.stride(-2) == 1 and t.shape[-2] > 1:
        return t.mT.contiguous().mT
    return t.contiguous()


@settings(max_examples=40, deadline=None)
@given(layout=st.sampled_from(LAYOUTS), batch=st.integers(0, 3), rows=st.integers(0, 4), transpose=st.booleans(),
       config=CONFIGS, seed=st.integers(0, 2**31))
def test_matmul_on_any_layout(layout, batch, rows, transpose, config, seed):
    leaf, view = strided([batch, rows, 5], layout, seed)
    weight = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))

    def product(dense):
        # both operands activations (a view of a leaf that needs a gradient is saved as a parameter is)
        def fn(x, w):
            w = (w * 1).mT if transpose else (w * 1).mT.contiguous()
            return RF.matmul(dense(x * 1), dense(w), config)
        return fn

    got = grads_of(product(lambda t: t), leaf, view, (weight,))
    want = grads_of(lambda x, w: torch.matmul(x, w.mT), leaf, view, (weight,))
    assert_same(got[:1], want[:1], exact=False)  # the output is torch's
    if config.exact:
        assert_same(got, want, exact=False)
    # the same draws on dense copies read in the same orientation: the same estimates
    assert_same(got, grads_of(product(_dense_like), leaf, view, (weight,)), exact=False)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(0, 4), min_size=1, max_size=4), layout=st.sampled_from(LAYOUTS),
       dim=st.integers(0, 3), log=st.booleans(), config=CONFIGS, seed=st.integers(0, 2**31))
def test_softmax_on_any_layout(shape, layout, dim, log, config, seed):
    dim = dim % len(shape)
    leaf, view = strided(shape, layout, seed)
    rad, torch_op = (RF.log_softmax, torch.log_softmax) if log else (RF.softmax, torch.softmax)
    got = grads_of(lambda x: rad(x, dim, config=config), leaf, view)
    want = grads_of(lambda x: torch_op(x, dim), leaf, view)
    assert_same(got[:1], want[:1])  # the output bitwise
    if config.exact:
        assert_same(got, want)
    assert_same(got, grads_of(lambda x: rad(x.contiguous(), dim, config=config), leaf, view), exact=False)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(0, 5), min_size=1, max_size=4), layout=st.sampled_from(LAYOUTS),
       batch_dims=st.integers(0, 4), keep=st.floats(0.05, 1.0), method=st.sampled_from(sorted(radgrad.METHODS)),
       per_example=st.booleans(), bits=st.sampled_from([None, *radgrad.BITS]), seed=st.integers(0, 2**31))
def test_pack_reads_any_layout_like_its_contiguous_copy(shape, layout, batch_dims, keep, method, per_example,
                                                        bits, seed):
    batch_dims = min(batch_dims, len(shape))
    leaf, view = strided(shape, layout, seed)
    x = view(leaf)
    config = SketchConfig(1.0 if method == "quantize" else keep, method, per_example or method == "norm", bits)
    sketch = pack(x, config, batch_dims=batch_dims, generator=torch.Generator().manual_seed(seed))
    again = pack(x.contiguous(), config, batch_dims=batch_dims, generator=torch.Generator().manual_seed(seed))
    if sketch.exact:
        assert sketch.values is x and again.values.equal(x)
    else:
        torch.testing.assert_close(sketch.values, again.values, rtol=1e-12, atol=1e-14)
    est = unpack(sketch)
    assert est.shape == x.shape
    torch.testing.assert_close(est, unpack(again), rtol=1e-12, atol=1e-14)


def test_channels_last_convnet_trains_like_torch_at_keep_one():
    model, rad, x, y = channels_last_convnet()
    for net in (model, rad):
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), rad.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-14, msg=name)


def test_relu_on_a_transposed_tensor_trains_like_torch():
    a = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    got = torch.autograd.grad((radgrad.nn.ReLU()(a.t()) @ w).square().sum(), (a, w))
    want = torch.autograd.grad((torch.relu(a.t()) @ w).square().sum(), (a, w))
    assert_same(got, want)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_relu_mask_keeps_the_layout(memory_format):
    x = torch.randn(2, 3, 4, 5).to(memory_format=memory_format)
    x[0, 0, 0, :2] = torch.tensor([float("nan"), -0.0])
    mask = radgrad.bits.unpack(radgrad.bits.pack(x))
    assert torch.equal(mask.bool(), x != 0) and mask.stride() == (x != 0).stride()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_compiled_relu_backward_matches_eager(memory_format):
    x = torch.randn(2, 3, 4, 5)
    x[0, 0, 0, :2] = torch.tensor([float("nan"), -0.0])
    x = x.to(memory_format=memory_format)
    g = torch.randn(x.shape).to(memory_format=memory_format)

    def grad_of(fn):
        leaf = x.detach().requires_grad_()
        return torch.autograd.grad(fn(leaf), leaf, g)[0]

    want = grad_of(torch.relu)
    got = grad_of(torch.compile(RF.relu, fullgraph=True, backend="aot_eager"))
    assert torch.equal(got, want)
    assert torch.equal(grad_of(RF.relu), want)


@pytest.mark.parametrize("shape,transpose", [((), False), ((13,), False), ((4, 6), False), ((5, 7), True),
                                             ((3, 5, 8), False), ((0, 3), False)])
def test_compiled_bit_planes_match_torch(shape, transpose):
    # tensors of up to 3 dimensions are packed in bit planes inside inductor's
    # kernels (NOTE [Masks under torch.compile]), entry counts padded or not
    torch.manual_seed(0)
    base = torch.randn(shape[::-1] if transpose else shape)
    if base.numel() >= 2:
        base.view(-1)[:2] = torch.tensor([float("nan"), -0.0])
    x = base.t() if transpose else base
    g = torch.randn(x.shape)

    def grad_of(fn):
        leaf = x.detach().requires_grad_()
        return torch.autograd.grad(fn(leaf), leaf, g)[0]

    # static shapes: each case compiles its own kernels rather than symbolic ones for all
    assert torch.equal(grad_of(torch.compile(RF.relu, fullgraph=True, dynamic=False)), grad_of(torch.relu))
    mask = torch.compile(lambda t: radgrad.bits.unpack(radgrad.bits.pack(t)), fullgraph=True, dynamic=False)(x)
    assert torch.equal(mask.bool(), x != 0)
