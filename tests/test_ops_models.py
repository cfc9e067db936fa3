"""The ops real models need: activations, dropout, layer norm, attention.

For each op: the exact parts equal torch's, and the estimated gradients are
unbiased (mean of N draws within Z_BOUND measured standard errors of float64
autograd, with a power check that a 10% bias would be caught).
"""

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import radgrad
import radgrad.functional as RF
from problems import assert_same_up_to_rounding, assert_unbiased, assert_unbiased_paired
from radgrad import SketchConfig

CONFIGS = [SketchConfig(method="quantize", bits=2), SketchConfig(0.5, "sample")]
N = 3000
# Rounding spreads far less than sampling: with a third of the draws, a 10% bias of a quantized
# estimate still sits 11 or more standard errors out in every test here (assert_unbiased checks).
N_QUANTIZED = 1000


def _count(config: SketchConfig) -> int:
    return N_QUANTIZED if config.method == "quantize" else N


def _grads(fn, *tensors):
    for t in tensors:
        t.grad = None
    out = fn(*tensors)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    (out * weights).sum().backward()
    return torch.cat([t.grad.reshape(-1) for t in tensors])


def _draws(fn, tensors, n=N):
    return torch.stack([_grads(fn, *tensors) for _ in range(n)])


@pytest.mark.parametrize("config", CONFIGS, ids=["quantize", "sample"])
@pytest.mark.parametrize("act", [F.gelu, F.silu, torch.tanh, lambda x: F.gelu(x, approximate="tanh")],
                         ids=["gelu", "silu", "tanh", "gelu-tanh"])
def test_elementwise_exact_output_unbiased_input_grad(act, config):
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.equal(RF.elementwise(act, x, config), act(x))
    exact = _grads(act, x)
    assert_unbiased(_draws(lambda t: RF.elementwise(act, t, config), [x], _count(config)), exact)


def _drop_path(x):
    """A model's stochastic depth: each example kept whole (scaled by 2) or dropped, at random."""
    kept = (torch.rand(x.shape[0], *[1] * (x.dim() - 1), dtype=x.dtype, device=x.device) + 0.5).floor_()
    return x * kept * 2


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_random_elementwise_function_gets_the_derivative_of_its_own_draw(compiled):
    # fn is called once: its output and the derivative saved come from one draw. Each example's
    # derivative rows are constant (0 or 2), which quantization stores exactly.
    torch.manual_seed(0)
    x = (torch.rand(16, 3, 5, dtype=torch.float64) + 1).requires_grad_()
    run = lambda t: RF.elementwise(_drop_path, t, CONFIGS[0])  # noqa: E731
    if compiled:
        run = torch.compile(run, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        y = run(x)
        (grad,) = torch.autograd.grad(y.sum(), x)
        kept = y[:, 0, 0] != 0
        assert 0 < int(kept.sum()) < 16
        assert torch.equal(grad, (y != 0).to(x.dtype) * 2)


@pytest.mark.parametrize("config", [*CONFIGS, SketchConfig(1.0, bits=8)], ids=["quantize", "sample", "bits8"])
def test_backward_can_run_twice(config):
    # backward passes overwrite the estimates they rebuild: the sketches themselves stay intact
    torch.manual_seed(0)
    x = torch.randn(4, 6, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    for fn in (lambda t: RF.elementwise(F.gelu, t, config),
               lambda t: RF.layer_norm(t, [8], weight, None, 1e-5, config),
               lambda t: RF.batch_norm(t, None, None, weight[:6], None, True, 0.1, 1e-5, config),
               lambda t: RF.softmax(t, -1, config=config) * weight, lambda t: RF.log_softmax(t, -1, config=config),
               lambda t: RF.matmul(t * 1, (t * weight).mT, config)):
        y = fn(x)
        g = torch.randn_like(y)
        first = torch.autograd.grad(y, [x, weight], g, retain_graph=True, allow_unused=True)
        second = torch.autograd.grad(y, [x, weight], g, allow_unused=True)
        assert first[0] is not None
        assert all(a is b is None or torch.equal(a, b) for a, b in zip(first, second))


def test_dropout_is_exact_and_stores_bits():
    x = torch.randn(64, 33, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    y = RF.dropout(x, 0.3)
    torch.manual_seed(1)
    expected, mask = torch.ops.aten.native_dropout(x.detach(), 0.3, True)
    assert torch.equal(y.detach(), expected)
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, g)
    assert torch.equal(grad, torch.ops.aten.native_dropout_backward(g, mask, 1 / 0.7))
    from radgrad import memory
    with memory.record() as rec:
        RF.dropout(x, 0.3)
    assert rec.total == -(-x.numel() // 8)


@pytest.mark.parametrize("config", CONFIGS, ids=["quantize", "sample"])
def test_layer_norm_exact_output_unbiased_grads(config):
    torch.manual_seed(0)
    x = (torch.randn(3, 2, 5, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.equal(RF.layer_norm(x, (5,), w, b, 1e-5, config), F.layer_norm(x, (5,), w, b, 1e-5))
    exact = _grads(lambda *t: F.layer_norm(t[0], (5,), t[1], t[2]), x, w, b)
    samples = _draws(lambda *t: RF.layer_norm(t[0], (5,), t[1], t[2], 1e-5, config), [x, w, b], _count(config))
    n_b = b.numel()
    # bias gradient exact (summed in another order; one entry is a rounding-level zero)
    torch.testing.assert_close(samples[:, -n_b:], exact[-n_b:].expand(len(samples), -1), rtol=1e-12, atol=1e-14)
    assert_unbiased(samples[:, :-n_b], exact[:-n_b])


def test_layer_norm_one_sketch_used_twice_would_be_biased():
    # The reason for two independent sketches (NOTE [Layer norm from two sketches]):
    # reading one sketch for both factors of dx is caught by the same test.
    from radgrad.functional import _norm

    config = SketchConfig(method="quantize", bits=1)
    torch.manual_seed(0)
    x = (torch.randn(2, 6, dtype=torch.float64) * 2).requires_grad_()
    exact = _grads(lambda t: F.layer_norm(t, (6,)), x)
    original = _norm._packed

    def same_draw(output, t, config, batch_dims, fresh=False, copies=1):
        assert copies == 2
        state = torch.get_rng_state()
        output, *a = original(output, t, config, batch_dims, fresh)
        torch.set_rng_state(state)
        output, *b = original(output, t, config, batch_dims, fresh)
        return output, *a, *b

    _norm._packed = same_draw
    try:
        samples = _draws(lambda t: RF.layer_norm(t, (6,), None, None, 1e-5, config), [x])
    finally:
        _norm._packed = original
    with pytest.raises(AssertionError, match="z-score"):
        assert_unbiased(samples, exact)


def _attention_inputs(causal_mask=None):
    torch.manual_seed(0)
    q = torch.randn(2, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("config", CONFIGS, ids=["quantize", "sample"])
@pytest.mark.parametrize("mask", ["none", "causal", "bool", "float"])
def test_attention_exact_output_unbiased_grads(config, mask):
    q, k, v = _attention_inputs()
    kwargs = {}
    if mask == "causal":
        kwargs["is_causal"] = True
    elif mask == "bool":
        kwargs["attn_mask"] = torch.rand(4, 5, generator=torch.Generator().manual_seed(3)) > 0.3
    elif mask == "float":
        kwargs["attn_mask"] = torch.randn(2, 1, 4, 5, dtype=torch.float64)
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert torch.equal(RF.scaled_dot_product_attention(q, k, v, config=config, **kwargs), expected)
    exact = _grads(lambda *t: F.scaled_dot_product_attention(*t, **kwargs), q, k, v)
    samples = _draws(lambda *t: RF.scaled_dot_product_attention(*t, config=config, **kwargs), [q, k, v],
                     _count(config))
    n_v = v.numel()
    assert_same_up_to_rounding(samples[:, -n_v:], exact[-n_v:].expand(len(samples), -1))  # value gradient exact
    assert_unbiased(samples[:, :-n_v], exact[:-n_v])


@pytest.mark.parametrize("dropout_p", [0.0, 0.4], ids=["fused", "dropout"])
def test_attention_learned_bias_gets_an_unbiased_gradient(dropout_p, n=1000):
    # a position bias per head, broadcast over the batch (Swin's, T5's): dS summed over the batch
    config = CONFIGS[0]
    q, k, v = _attention_inputs()
    bias = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    scale = 1 / 3**0.5
    samples, exacts = [], []
    for seed in range(n):
        torch.manual_seed(seed)
        samples.append(_grads(lambda q, k, b, v: RF.scaled_dot_product_attention(q, k, v, b, dropout_p, config=config),
                              q, k, bias, v))
        if dropout_p or seed == 0:
            torch.manual_seed(seed)
            probs = torch.softmax(q.detach() @ k.detach().transpose(-2, -1) * scale + bias.detach(), -1)
            mask = torch.ops.aten.native_dropout(probs, dropout_p, True)[1].to(q.dtype) / (1 - dropout_p)
            exacts.append(_grads(lambda q, k, b, v: (torch.softmax(q @ k.transpose(-2, -1) * scale + b, -1) * mask) @ v,
                                 q, k, bias, v))
    samples = torch.stack(samples)
    exacts = torch.stack(exacts).expand(n, -1)
    if not dropout_p:
        assert_same_up_to_rounding(exacts[0], _grads(lambda q, k, b, v: F.scaled_dot_product_attention(q, k, v, b),
                                                     q, k, bias, v))
    n_v = v.numel()
    assert_same_up_to_rounding(samples[:, -n_v:], exacts[:, -n_v:])  # value gradient exact
    estimated, exact = samples[:, :-n_v], exacts[:, :-n_v]
    assert_unbiased_paired(estimated, exact)
    assert (estimated[:, -bias.numel():] != exact[:, -bias.numel():]).any()  # the bias gradient is an estimate


def test_attention_with_dropout_unbiased_for_each_mask():
    # Dropout makes torch's own gradient random. Each draw is compared with the
    # exact gradient for its own mask (the first thing drawn after seeding):
    # the paired differences must average to zero.
    q, k, v = _attention_inputs()
    config = SketchConfig(method="quantize", bits=2)
    scale = 1 / 3**0.5
    samples, exacts = [], []
    for seed in range(1500):
        torch.manual_seed(seed)
        samples.append(_grads(lambda *t: RF.scaled_dot_product_attention(*t, dropout_p=0.4, config=config),
                              q, k, v))
        torch.manual_seed(seed)
        probs = torch.softmax(q.detach() @ k.detach().transpose(-2, -1) * scale, -1)
        mask = torch.ops.aten.native_dropout(probs, 0.4, True)[1].to(q.dtype) / 0.6
        if seed == 0:
            torch.manual_seed(seed)
            out = RF.scaled_dot_product_attention(q, k, v, dropout_p=0.4, config=config)
            assert_same_up_to_rounding(out.detach(), (probs * mask) @ v.detach())
        exacts.append(_grads(lambda q, k, v: (torch.softmax(q @ k.transpose(-2, -1) * scale, -1) * mask) @ v,
                             q, k, v))
    samples, exacts = torch.stack(samples), torch.stack(exacts)
    n_v = v.numel()
    assert_same_up_to_rounding(samples[:, -n_v:], exacts[:, -n_v:])
    assert_unbiased_paired(samples[:, :-n_v], exacts[:, :-n_v])


@pytest.mark.parametrize("config", CONFIGS, ids=["quantize", "sample"])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 2, 3, 2)], ids=["1d", "1d-seq", "2d"])
def test_batch_norm_exact_output_and_stats_unbiased_grads(config, shape):
    torch.manual_seed(0)
    x = (torch.randn(*shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    c = shape[1]
    w = torch.randn(c, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c, dtype=torch.float64, requires_grad=True)
    stats = [torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)]
    torch_stats = [t.clone() for t in stats]
    out = RF.batch_norm(x, *stats, w, b, True, 0.1, 1e-5, config)
    assert torch.equal(out, F.batch_norm(x, *torch_stats, w, b, True, 0.1, 1e-5))
    assert all(torch.equal(s, t) for s, t in zip(stats, torch_stats))  # running statistics updated alike
    exact = _grads(lambda *t: F.batch_norm(t[0], None, None, t[1], t[2], True), x, w, b)
    samples = _draws(lambda *t: RF.batch_norm(t[0], None, None, t[1], t[2], True, 0.1, 1e-5, config), [x, w, b],
                     _count(config))
    torch.testing.assert_close(samples[:, -c:], exact[-c:].expand(len(samples), -1), rtol=1e-12, atol=1e-14)
    assert_unbiased(samples[:, :-c], exact[:-c])


def _group_norms(kind, groups, config):
    """(radgrad's, torch's) function of (input, weight, bias): group norm, or instance norm with its
    input's statistics."""
    if kind == "group":
        return (lambda *t: RF.group_norm(t[0], groups, t[1], t[2], 1e-5, config),
                lambda *t: F.group_norm(t[0], groups, t[1], t[2], 1e-5))
    return (lambda *t: RF.instance_norm(t[0], None, None, t[1], t[2], True, 0.1, 1e-5, config),
            lambda *t: F.instance_norm(t[0], None, None, t[1], t[2], True, 0.1, 1e-5))


# Every estimator passes through the same reshaping into groups: sampling is tested on one case.
@pytest.mark.parametrize("kind, shape, groups, config", [
    ("group", (4, 6), 2, CONFIGS[0]), ("group", (3, 4, 5), 2, CONFIGS[0]), ("group", (2, 4, 8, 16), 2, CONFIGS[0]),
    ("instance", (2, 6, 4, 3), 6, CONFIGS[0]), ("instance", (2, 6, 4, 3), 6, CONFIGS[1]),
], ids=["group-no-positions", "group-1d", "group-2d-by-plane", "instance-2d", "instance-2d-sample"])
def test_group_and_instance_norm_exact_output_unbiased_grads(kind, shape, groups, config):
    torch.manual_seed(0)
    x = (torch.randn(*shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    c = shape[1]
    w, b = (torch.randn(c, dtype=torch.float64, requires_grad=True) for _ in range(2))
    rad, plain = _group_norms(kind, groups, config)
    assert torch.equal(rad(x, w, b), plain(x, w, b))
    exact = _grads(plain, x, w, b)
    samples = _draws(rad, [x, w, b], _count(config))
    # the bias gradient is the upstream gradient's sum over examples and positions: exact
    torch.testing.assert_close(samples[:, -c:], exact[-c:].expand(len(samples), -1), rtol=1e-12, atol=1e-14)
    assert_unbiased(samples[:, :-c], exact[:-c])


def test_instance_norm_updates_running_statistics_as_torch_does():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    stats = [torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)]
    torch_stats = [t.clone() for t in stats]
    out = RF.instance_norm(x, *stats, None, None, True, 0.1, 1e-5, CONFIGS[0])
    assert torch.equal(out, F.instance_norm(x, *torch_stats, None, None, True, 0.1, 1e-5))
    assert all(torch.equal(s, t) for s, t in zip(stats, torch_stats))
    # with the running statistics it is torch's function: the same output, the same bytes saved
    with radgrad.memory.record() as rad:
        out = RF.instance_norm(x, *stats, None, None, False, 0.1, 1e-5, CONFIGS[0])
    with radgrad.memory.record() as plain:
        assert torch.equal(out, F.instance_norm(x, *stats, None, None, False, 0.1, 1e-5))
    assert rad.total == plain.total > 0


def test_group_norm_refuses_what_torch_refuses():
    x = torch.randn(2, 6, 4, requires_grad=True)
    for groups in (4, 0):
        with pytest.raises(Exception) as want:
            F.group_norm(x, groups)
        with pytest.raises(want.type, match=re.escape(str(want.value))):
            RF.group_norm(x, groups, config=CONFIGS[0])


def test_layer_norm_over_every_dimension_is_unbiased():
    # no batch dimension: the weight gradient sums over none (Tensor.sum(()) would sum over all)
    torch.manual_seed(0)
    config = SketchConfig(method="quantize", bits=2)
    x = (torch.randn(3, 5, dtype=torch.float64) * 2 + 1).requires_grad_()
    w, b = (torch.randn(3, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    exact = _grads(lambda *t: F.layer_norm(t[0], (3, 5), t[1], t[2]), x, w, b)
    samples = _draws(lambda *t: RF.layer_norm(t[0], (3, 5), t[1], t[2], 1e-5, config), [x, w, b], _count(config))
    torch.testing.assert_close(samples[:, -b.numel():], exact[-b.numel():].expand(len(samples), -1),
                               rtol=1e-12, atol=1e-14)
    assert_unbiased(samples[:, :-b.numel()], exact[:-b.numel()])


@pytest.mark.parametrize("shape, normalized", [
    ((3, 2, 16, 8), None), ((2, 2, 4, 8, 4), None), ((2, 3, 8, 16), (8, 16)), ((4, 32), (4, 32)),
    ((2, 4, 8, 16), "groups"),
], ids=["bn2d", "bn3d", "ln-two-dims", "ln-every-dim", "gn2d"])
def test_normalization_read_by_code_planes_gives_the_input_shaped_gradient(shape, normalized, monkeypatch):
    # Rows of 128 entries over several dimensions fill four 2-bit code planes 32 wide and are
    # read in a planes shape (NOTE [Reading codes by plane]); after the same seed the gradients
    # must be those of the input-shaped formulas, whose unbiasedness the tests above measure.
    from radgrad.functional import _norm

    config = SketchConfig(method="quantize", bits=2)
    x = (torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 + 1)
    per_channel = normalized in (None, "groups")
    w, b = (torch.randn(shape[1] if per_channel else normalized, dtype=torch.float64) for _ in range(2))
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    if normalized is None:
        fn = lambda *t: RF.batch_norm(t[0], None, None, t[1], t[2], True, 0.1, 1e-5, config)  # noqa: E731
    elif normalized == "groups":
        fn = lambda *t: RF.group_norm(t[0], 2, t[1], t[2], 1e-5, config)  # noqa: E731
    else:
        fn = lambda *t: RF.layer_norm(t[0], normalized, t[1], t[2], 1e-5, config)  # noqa: E731
    used = []
    planes = _norm._planes
    monkeypatch.setattr(_norm, "_planes", lambda *a: used.append(planes(*a)) or used[-1])
    torch.manual_seed(1)
    by_plane = _grads(fn, x, w, b)
    assert used and used[0] is not None
    monkeypatch.setattr(_norm, "_planes", lambda *a: None)
    torch.manual_seed(1)
    by_shape = _grads(fn, x, w, b)
    assert torch.equal(by_plane, by_shape)


def _projected_attention(h, w, config, dropout_p=0.0, touch=None):
    """q, k, v as views of RAD linear outputs of one hidden state h, as transformers make them."""
    heads = lambda t: t.view(*t.shape[:-1], 2, 3).transpose(-3, -2)  # noqa: E731
    q, k, v = (heads(RF.linear(h, w[i], None, config)) for i in range(3))
    if touch is not None:
        touch(q, k)
    return RF.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, config=config)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["fused", "dropout"])
def test_attention_rebuilds_projected_queries_and_keys_and_saves_their_input_once(dropout_p):
    from radgrad.functional import _attention
    config = SketchConfig(method="quantize", bits=2)
    torch.manual_seed(0)
    h = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, 6, dtype=torch.float64, requires_grad=True)

    def run():
        torch.manual_seed(1)
        h.grad = w.grad = None
        _projected_attention(h, w, config, dropout_p).pow(2).sum().backward()
        return h.grad.clone(), w.grad.clone()

    def saved():
        torch.manual_seed(1)
        with radgrad.memory.record() as rec:
            _projected_attention(h, w, config, dropout_p)
        return rec.total

    rebuilt, rebuilt_saved = run(), saved()
    original = _attention.source
    _attention.source = lambda *t: None
    try:
        stored, stored_saved = run(), saved()
    finally:
        _attention.source = original
    # the same draws, and q, k recomputed bit for bit: the same gradients
    assert all(torch.equal(a, b) for a, b in zip(rebuilt, stored))
    # q and k (each as large as h here) were saved; now h is, once
    assert stored_saved - rebuilt_saved == h.numel() * h.element_size()


def _rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), dim=-1)


class _RotaryAttention(nn.Module):
    """Attention as Llama writes it: scaled, rotated queries and keys; keys through an empty cache;
    ``residual=True`` adds a full-size activation to the queries, which no recipe should replay."""

    def __init__(self, residual=False):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(8, 8) for _ in range(3))
        self.residual = residual

    def forward(self, h):
        heads = lambda t: t.view(*t.shape[:-1], 2, 4).transpose(-3, -2)  # noqa: E731
        angles = torch.arange(h.shape[-2], dtype=h.dtype)[:, None] * torch.linspace(0.1, 1, 4, dtype=h.dtype)
        cos, sin = angles.cos()[None, None], angles.sin()[None, None]
        q, k, v = heads(self.q(h)) * 0.5, heads(self.k(h)), heads(self.v(h))
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k = torch.cat([k.new_zeros(*k.shape[:-2], 0, 4), k], dim=-2)
        if self.residual:
            q = q + heads(h.tanh())  # an activation: saving it would cost what q costs
        return F.scaled_dot_product_attention(q, k, v)


def _rebuilt_and_stored(model, h):
    """``(gradients, saved bytes)`` of a step under one seed, with attention rebuilding its queries
    and keys where it can, then with attention saving them."""
    from radgrad.functional import _attention

    def run():
        torch.manual_seed(1)
        with radgrad.memory.record(model) as rec:
            out = model(h)
        grads = torch.autograd.grad(out.pow(2).sum(), (h, *model.parameters()))
        return torch.cat([g.reshape(-1) for g in grads]), rec.total

    rebuilt = run()
    original = _attention.source
    _attention.source = lambda *t: None
    try:
        return rebuilt, run()
    finally:
        _attention.source = original


@pytest.mark.parametrize("residual", [False, True], ids=["rotary", "rotary-residual"])
def test_attention_rebuilds_rotated_queries_and_keys_from_the_projections_input(residual):
    torch.manual_seed(0)
    model = radgrad.convert(_RotaryAttention(residual).double(), method="quantize")
    h = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    (rebuilt, rebuilt_saved), (stored, stored_saved) = _rebuilt_and_stored(model, h)
    assert torch.equal(rebuilt, stored)  # the same draws, q and k rebuilt bit for bit
    bytes_of = h.numel() * h.element_size()  # q, k and h are each this large
    # stored: q and k; rebuilt: h in their place (cos and sin are saved by the products either way);
    # with the residual, q itself and h in k's place
    assert stored_saved - rebuilt_saved == (0 if residual else bytes_of)


class _CopiedHeadsAttention(nn.Module):
    """Attention as Whisper writes it: each projection scaled or not, split into heads and copied
    (``contiguous()``, or ``clone()``) before attention reads it."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(8, 8) for _ in range(3))

    def forward(self, h):
        heads = lambda t: t.view(*t.shape[:-1], 2, 4).transpose(-3, -2)  # noqa: E731
        q = heads(self.q(h) * 0.5).contiguous()
        k = torch.clone(heads(self.k(h)), memory_format=torch.contiguous_format)
        return F.scaled_dot_product_attention(q, k, heads(self.v(h)).contiguous())


def test_attention_rebuilds_copied_queries_and_keys_from_the_projections_input():
    torch.manual_seed(0)
    model = radgrad.convert(_CopiedHeadsAttention().double(), method="quantize")
    h = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    (rebuilt, rebuilt_saved), (stored, stored_saved) = _rebuilt_and_stored(model, h)
    assert torch.equal(rebuilt, stored)  # the same draws, q and k rebuilt bit for bit
    # stored: q and k; rebuilt: h in their place
    assert stored_saved - rebuilt_saved == h.numel() * h.element_size()


def test_rebuilding_leaves_no_garbage_cycles():
    # a cycle holding the rebuilt queries and keys would keep them alive until the collector runs:
    # a higher peak, and one that changes from run to run
    import gc
    model = radgrad.convert(_RotaryAttention().double(), method="quantize")
    h = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    model(h).sum().backward()
    while gc.collect():  # a collection's finalizers can free more cycles: drain them all first
        pass
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # keep what a collection finds unreachable, to look at it
    try:
        model(h).sum().backward()
        gc.collect()
        # tensors this eager step could have made only: compiling tests run before in this process
        # leave fake tensors, and tensors of symbolic shape, whose caches may let go of them any time
        leaked = [o.shape for o in gc.garbage
                  if type(o) is torch.Tensor and not o.is_meta and all(type(d) is int for d in o.shape)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not leaked


def test_one_recipe_rebuilds_queries_and_keys_of_a_fused_projection_with_one_product():
    from radgrad.functional._source import rebuild, source
    torch.manual_seed(0)
    h = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    fused = RF.linear(h, torch.randn(18, 6, dtype=torch.float64), None, SketchConfig(method="quantize"))
    q, k, v = (t.view(2, 5, 2, 3).transpose(1, 2) for t in fused.split(6, dim=-1))
    unknown = torch.randn(2, 2, 5, 3, dtype=torch.float64)
    recipe = source(q, unknown, k)
    steps, outputs = recipe.program
    assert [step[0] for step in steps] == ["linear"] and outputs[1] is None  # the product computed once
    rebuilt = rebuild(recipe.program, iter(recipe.tensors))
    assert torch.equal(rebuilt[0], q) and rebuilt[1] is None and torch.equal(rebuilt[2], k)
    assert source(unknown) is None


def test_an_op_returning_its_argument_adds_no_step():
    # contiguous() of a contiguous linear output is that output: nothing new to record
    from radgrad.functional._source import record_op, source
    h = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    out = RF.linear(h, torch.randn(6, 6, dtype=torch.float64), None, SketchConfig(method="quantize"))
    same = out.contiguous()
    record_op(same, torch.Tensor.contiguous, (out,), {})
    assert same is out and [step[0] for step in source(same).program[0]] == ["linear"]


def test_recipes_replay_short_chains_of_unmodified_tensors_only():
    from radgrad.functional._source import MAX_STEPS, rebuild, record_op, source
    torch.manual_seed(0)
    h = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    chain = [RF.linear(h, torch.randn(6, 6, dtype=torch.float64), None, SketchConfig(method="quantize"))]
    scale = torch.rand(6, dtype=torch.float64)
    for _ in range(MAX_STEPS):
        chain.append(chain[-1] * scale)
        record_op(chain[-1], torch.mul, (chain[-2], scale), {})
    recipe = source(chain[-2])  # the linear step and MAX_STEPS - 1 products
    assert torch.equal(rebuild(recipe.program, iter(recipe.tensors))[0], chain[-2])
    assert source(chain[-1]) is None  # one step too many
    big = torch.randn(2, 5, 6, dtype=torch.float64)
    summed = chain[1] + big
    record_op(summed, torch.add, (chain[1], big), {})
    assert source(summed) is None  # reads a tensor as large as its output: not recorded
    halved = chain[1] / 2.0
    record_op(halved, torch.div, (chain[1], 2.0), {})
    assert source(halved) is not None
    scale.mul_(2.0)  # a tensor a recipe reads, modified after the fact
    assert source(chain[2]) is None


def test_attention_saves_queries_modified_in_place_instead_of_rebuilding_them():
    config = SketchConfig(method="quantize", bits=2)
    torch.manual_seed(0)
    h = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, 6, dtype=torch.float64, requires_grad=True)

    def scale_queries(q, k):
        q.mul_(2.0)  # after the projection: a rebuilt q would miss this

    def grads(touch, fn):
        torch.manual_seed(1)
        h.grad = w.grad = None
        fn(touch).pow(2).sum().backward()
        return torch.cat([h.grad.reshape(-1), w.grad.reshape(-1)])

    def by_hand(touch):
        heads = lambda t: t.view(*t.shape[:-1], 2, 3).transpose(-3, -2)  # noqa: E731
        q, k, v = (heads(RF.linear(h, w[i], None, config)) for i in range(3))
        return RF.scaled_dot_product_attention(q * 2.0, k, v, config=config)

    assert torch.equal(grads(scale_queries, lambda t: _projected_attention(h, w, config, touch=t)),
                       grads(None, by_hand))


def _operand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_()


# leaf shapes, and the operands a model would compute from them (activations, not leaves)
MATMUL_CASES = {
    "batched": ([(2, 3, 4), (2, 4, 5)], lambda a, b: (a * 1, b * 1)),
    "broadcast": ([(2, 1, 3, 4), (3, 4, 5)], lambda a, b: (a * 1, b * 1)),
    "transposed": ([(2, 3, 4), (2, 5, 4)], lambda a, b: (a * 1, (b * 1).mT)),  # a key, as q @ k^T reads it
    "same-tensor": ([(2, 3, 4)], lambda a: (a * 1, (a * 1).mT)),
}


@pytest.mark.parametrize("config", CONFIGS, ids=["quantize", "sample"])
@pytest.mark.parametrize("case", MATMUL_CASES)
def test_matmul_exact_output_unbiased_grads(config, case):
    torch.manual_seed(0)  # the draws
    shapes, operands = MATMUL_CASES[case]
    leaves = [_operand(*shape, seed=i) for i, shape in enumerate(shapes)]
    assert torch.equal(RF.matmul(*operands(*leaves), config), torch.matmul(*operands(*leaves)))
    exact = _grads(lambda *t: torch.matmul(*operands(*t)), *leaves)
    samples = _draws(lambda *t: RF.matmul(*operands(*t), config), leaves, _count(config))
    assert samples.std(0).max() > 0  # sketched, not saved as they are
    assert_unbiased(samples, exact)


@pytest.mark.parametrize("config", CONFIGS, ids=["quantize", "sample"])
def test_baddbmm_exact_output_and_added_gradient_unbiased_product_gradients(config):
    # Bloom's attention scores: beta * alibi + alpha * q @ k^T, the bias broadcast over queries
    torch.manual_seed(0)
    leaves = [_operand(*shape, seed=i) for i, shape in enumerate([(4, 1, 6), (4, 5, 3), (4, 6, 3)])]

    def scores(fn):
        return lambda base, q, k: fn(base.expand(4, 5, 6), q * 1, (k * 1).mT)

    torch_scores = scores(lambda *t: torch.baddbmm(*t, beta=0.5, alpha=2.0))
    rad_scores = scores(lambda *t: RF.baddbmm(*t, 0.5, 2.0, config))
    assert torch.equal(rad_scores(*leaves), torch_scores(*leaves))
    exact = _grads(torch_scores, *leaves)
    samples = _draws(rad_scores, leaves, _count(config))
    added = leaves[0].numel()
    assert samples[:, :added].std(0).max() == 0  # the added tensor's gradient reads no sketch
    assert_same_up_to_rounding(samples[0, :added], exact[:added])
    assert samples[:, added:].std(0).min() > 0
    assert_unbiased(samples[:, added:], exact[added:])


def test_baddbmm_is_routed_and_saves_what_matmul_saves():
    config = SketchConfig(method="quantize", bits=2)

    class Scores(nn.Module):
        def forward(self, base, q, k):
            return torch.baddbmm(base, q, k.mT, beta=1.0, alpha=0.5)

    q, k = (_operand(4, 16, 8, seed=i) * 1 for i in (1, 2))
    base = torch.zeros(4, 1, 16, dtype=torch.float64)
    model = radgrad.convert(Scores(), method="quantize")
    with radgrad.memory.record() as routed:
        model(base, q, k)
    with radgrad.memory.record() as by_hand:
        RF.matmul(q, k.mT, config)
    assert routed.total == by_hand.total
    with radgrad.memory.record() as plain:
        Scores()(base, q, k)
    assert routed.total < plain.total / 4


def test_matmul_saves_a_parameter_operand_as_it_is_and_sketches_the_activation():
    config = SketchConfig(method="quantize", bits=2)
    x = _operand(8, 6, 16, seed=0) * 1  # an activation
    weight = nn.Parameter(_operand(16, 32, seed=1).detach())
    assert torch.equal(RF.matmul(x, weight.mT.mT, config), x @ weight)
    # the input gradient is exact: it reads the parameter, never a sketch
    g = torch.randn(8, 6, 32, dtype=torch.float64)
    (grad_x,) = torch.autograd.grad(RF.matmul(x, weight.mT.mT, config), x, g)
    assert_same_up_to_rounding(grad_x, g @ weight.detach().mT)
    sketch_bytes = radgrad.pack(x.detach(), config, batch_dims=2).nbytes
    assert 0 < sketch_bytes < x.numel() * x.element_size() / 8
    with radgrad.memory.record() as rec:
        RF.matmul(x, weight, config)
    assert rec.total == sketch_bytes  # the parameter is saved as it is: nothing new
    with radgrad.memory.record() as rec:
        RF.matmul(x.detach() * 1, weight, config)  # only the parameter needs a gradient: x alone, sketched
    assert rec.total == sketch_bytes
    frozen = nn.Parameter(weight.detach(), requires_grad=False)  # a frozen weight (LoRA's) lives on anyway
    with radgrad.memory.record() as rec:
        out = RF.matmul(x, frozen, config)
    assert rec.total == 0 and torch.equal(out, x @ frozen)


@pytest.mark.parametrize("config", [*CONFIGS, SketchConfig(method="quantize")],
                         ids=["quantize", "sample", "quantize-default-bits"])
@pytest.mark.parametrize("dim", [-1, 1])
def test_softmax_exact_output_unbiased_grad(config, dim):
    torch.manual_seed(0)  # the draws
    x = (_operand(3, 4, 5, seed=0) * 2).detach().requires_grad_()
    assert torch.equal(RF.softmax(x, dim, config=config), torch.softmax(x, dim))
    # output gradients that vary along the softmax's rows (_grads' alone barely do: tiny gradients)
    w = _operand(3, 4, 5, seed=1).detach()
    exact = _grads(lambda t: torch.softmax(t, dim) * w, x)
    assert_unbiased(_draws(lambda t: RF.softmax(t, dim, config=config) * w, [x], _count(config)), exact)


@pytest.mark.parametrize("config", CONFIGS, ids=["quantize", "sample"])
def test_log_softmax_exact_output_unbiased_grad(config):
    torch.manual_seed(0)  # the draws
    x = (_operand(3, 4, 5, seed=0) * 2).detach().requires_grad_()
    assert torch.equal(RF.log_softmax(x, -1, config=config), torch.log_softmax(x, -1))
    w = _operand(3, 4, 5, seed=1).detach()
    exact = _grads(lambda t: torch.log_softmax(t, -1) * w, x)
    assert_unbiased(_draws(lambda t: RF.log_softmax(t, -1, config=config) * w, [x], _count(config)), exact)


@pytest.mark.parametrize("config,bits", [(SketchConfig(method="quantize"), 4),
                                         (SketchConfig(method="quantize", bits=2), 2),
                                         (SketchConfig(method="quantize", softmax_bits=8), 8)])
def test_softmax_stores_its_output_in_softmax_bits(config, bits):
    x = torch.randn(3, 4, 5, requires_grad=True)
    sketch = radgrad.pack(torch.softmax(x.detach(), -1), SketchConfig(method="quantize", bits=bits), batch_dims=2)
    with radgrad.memory.record() as rec:
        RF.softmax(x, -1, config=config)
    assert rec.total == 2 * sketch.nbytes
    with radgrad.memory.record() as rec:  # log-softmax's one linear sketch keeps bits
        RF.log_softmax(x, -1, config=config)
    assert rec.total == radgrad.pack(torch.softmax(x.detach(), -1), config, batch_dims=2).nbytes


def test_softmax_in_another_dtype_returns_the_input_dtype_gradient():
    x = torch.randn(4, 6, requires_grad=True)
    config = SketchConfig(method="quantize", bits=8)
    y = RF.softmax(x, -1, torch.float64, config)
    assert y.dtype == torch.float64 and torch.equal(y, torch.softmax(x, -1, dtype=torch.float64))
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert grad.dtype == torch.float32


def test_softmax_one_sketch_used_twice_would_be_biased():
    torch.manual_seed(0)  # the draws
    # The reason for two independent sketches (NOTE [Softmax from two sketches]).
    from radgrad.functional import _softmax

    config = SketchConfig(method="quantize", bits=1)
    x = (_operand(2, 6, seed=0) * 2).detach().requires_grad_()
    w = _operand(2, 6, seed=1).detach()
    exact = _grads(lambda t: torch.softmax(t, -1) * w, x)
    original = _softmax._packed

    def same_draw(output, t, config, batch_dims, fresh=False, copies=1):
        output, *a = original(output, t, config, batch_dims, fresh)
        return output, *a, *a

    _softmax._packed = same_draw
    try:
        samples = _draws(lambda t: RF.softmax(t, -1, config=config) * w, [x])
    finally:
        _softmax._packed = original
    with pytest.raises(AssertionError, match="z-score"):
        assert_unbiased(samples, exact)


def test_softmax_without_dim_is_an_error():
    with pytest.raises(TypeError, match="dim must be an int"):
        RF.softmax(torch.randn(3, requires_grad=True), None)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_exact_loss_unbiased_grad(reduction):
    torch.manual_seed(0)  # the draws
    config = SketchConfig(method="quantize", bits=2)
    x = (_operand(4, 6, 3, seed=0) * 2).detach().requires_grad_()
    target = torch.randint(6, (4, 3), generator=torch.Generator().manual_seed(0))
    target[0, 0] = -100  # ignored
    weight = torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kwargs = dict(weight=weight, reduction=reduction)
    assert torch.equal(RF.cross_entropy(x, target, config=config, **kwargs), F.cross_entropy(x, target, **kwargs))
    exact = _grads(lambda t: F.cross_entropy(t, target, **kwargs), x)
    assert_unbiased(_draws(lambda t: RF.cross_entropy(t, target, config=config, **kwargs), [x]), exact)


def test_cross_entropy_saves_a_sketch_of_the_probabilities():
    config = SketchConfig(method="quantize", bits=2)
    logits = _operand(64, 1000, seed=0).float() * 1
    target = torch.randint(1000, (64,))
    with radgrad.memory.record() as rec:
        F.cross_entropy(logits, target)
    exact = rec.total
    with radgrad.memory.record() as rec:
        RF.cross_entropy(logits, target, config=config)
    assert rec.total == radgrad.pack(logits.detach(), config, batch_dims=1).nbytes + target.numel() * 8
    assert rec.total < exact / 10
    probabilities = F.cross_entropy(logits, target.float().softmax(0)[:, None].expand(-1, 1000))
    # probability targets, label smoothing: torch's function
    assert torch.equal(RF.cross_entropy(logits, target.float().softmax(0)[:, None].expand(-1, 1000),
                                        config=config), probabilities)
    assert torch.equal(RF.cross_entropy(logits, target, label_smoothing=0.1, config=config),
                       F.cross_entropy(logits, target, label_smoothing=0.1))


@pytest.mark.parametrize("config", CONFIGS, ids=["quantize", "sample"])
def test_rms_norm_exact_output_unbiased_grads(config):
    torch.manual_seed(0)
    x = (torch.randn(3, 2, 5, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.equal(RF.rms_norm(x, (5,), w, 1e-5, config), F.rms_norm(x, (5,), w, 1e-5))
    exact = _grads(lambda *t: F.rms_norm(t[0], (5,), t[1], 1e-5), x, w)
    assert_unbiased(_draws(lambda *t: RF.rms_norm(t[0], (5,), t[1], 1e-5, config), [x, w], _count(config)), exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rms_norm_output_is_torchs_bit_for_bit(dtype):
    # torch's formula, operation for operation, with torch's default epsilon, over two dimensions too
    torch.manual_seed(0)
    config = SketchConfig(method="quantize")
    for shape in ((7,), (3, 7)):
        x = torch.randn(4, 3, 7, dtype=dtype, requires_grad=True)
        w = torch.randn(shape, dtype=dtype, requires_grad=True)
        assert torch.equal(RF.rms_norm(x, shape, w, None, config), F.rms_norm(x, shape, w))
        assert torch.equal(RF.rms_norm(x, shape, None, None, config), F.rms_norm(x, shape))


def test_rms_norm_with_its_own_forward_keeps_that_output():
    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    own = lambda t: w.detach() * (t.float() * torch.rsqrt(t.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(t.dtype)  # noqa: E731
    y = RF.rms_norm(x, (6,), w, 1e-6, SketchConfig(method="quantize"), forward=own)
    assert torch.equal(y, own(x.detach()))
    assert y.requires_grad and y.grad_fn is not None


@pytest.mark.parametrize("config", CONFIGS, ids=["quantize", "sample"])
def test_elementwise_product_exact_output_unbiased_grads(config):
    # as in a gated MLP's act(gate) * up, both factors are activations, each saved as a sketch
    # (a SiLU as the gate would put entries within 1e-4 of a rounding level: never rounded up in
    # N draws, such an entry reads as constant, which the z-test cannot tell from a bias)
    torch.manual_seed(0)
    a = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    gated = lambda mul: lambda a, b: mul(torch.sin(a), b * 2)  # noqa: E731
    assert torch.equal(RF.mul(torch.sin(a), b * 2, config), torch.sin(a) * (b * 2))
    exact = _grads(gated(torch.mul), a, b)
    assert_unbiased(_draws(gated(lambda s, t: RF.mul(s, t, config)), [a, b], _count(config)), exact)


def test_elementwise_product_saves_sketches_and_keeps_small_factors():
    from radgrad import memory

    config = SketchConfig(method="quantize", bits=2)
    x = torch.randn(64, 32, requires_grad=True)
    a, b = x * 2, x * 3  # activations of the size of the output
    with memory.record() as rec:
        RF.mul(a, b, config)
    assert rec.total < a.numel() * 4 / 2  # two 2-bit sketches and their scales, not two float copies
    scale = torch.randn(64, 1, requires_grad=True) * 1  # broadcast: saved as it is, not sketched
    with memory.record() as rec:
        y = RF.mul(a, scale, config)
    assert rec.total < a.numel() * 4 / 4  # a's sketch (for the scale's gradient) and the scale
    assert torch.equal(y, a * scale)
    g = torch.randn_like(y)
    assert torch.equal(torch.autograd.grad(y, a, g)[0], g * scale)  # from the scale itself: exact
    w = nn.Parameter(torch.randn(64, 32))  # a parameter factor is saved as it is, the activation sketched
    y = RF.mul(a, w, config)
    assert torch.equal(torch.autograd.grad(y, a, g)[0], g * w)


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["fused", "dropout"])
def test_grouped_query_attention_stores_kv_heads_and_is_unbiased(dropout):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    config = SketchConfig(method="quantize", bits=2)
    from radgrad import memory
    with memory.record() as rec:
        RF.scaled_dot_product_attention(q, k, v, dropout_p=dropout, enable_gqa=True, config=config)
    # q and k exact at their own head counts, v as a sketch, a dropout mask as bits
    assert rec.total <= (q.numel() + k.numel()) * 8 + v.numel() * 8 / 4
    if dropout == 0.0:
        assert torch.equal(RF.scaled_dot_product_attention(q, k, v, enable_gqa=True, config=config),
                           F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        exact = _grads(lambda *t: F.scaled_dot_product_attention(*t, enable_gqa=True), q, k, v)
        samples = _draws(lambda *t: RF.scaled_dot_product_attention(*t, enable_gqa=True, config=config), [q, k, v])
    else:
        # the same dropout masks in both: each draw reseeds, so both sides drop the same entries
        samples, rows = [], []
        for seed in range(N // 2):
            torch.manual_seed(seed)
            samples.append(_grads(lambda *t: RF.scaled_dot_product_attention(*t, dropout_p=dropout,
                                                                             enable_gqa=True, config=config), q, k, v))
            torch.manual_seed(seed)
            rows.append(_grads(lambda *t: RF.scaled_dot_product_attention(*t, dropout_p=dropout, enable_gqa=True,
                                                                          config=SketchConfig(keep=1.0)), q, k, v))
        samples, exact_draws = torch.stack(samples), torch.stack(rows)
        n_v = v.numel()
        assert_same_up_to_rounding(samples[:, -n_v:], exact_draws[:, -n_v:])  # value gradient exact
        # paired: each draw's error against the exact gradient of its own mask, about their mean
        exact = exact_draws.mean(0)
        assert_unbiased((samples - exact_draws + exact)[:, :-n_v], exact[:-n_v])
        return
    n_v = v.numel()
    assert_same_up_to_rounding(samples[:, -n_v:], exact[-n_v:].expand(samples.shape[0], -1))  # value grad exact
    assert_unbiased(samples[:, :-n_v], exact[:-n_v])


def test_multi_query_attention_by_broadcasting_stores_one_head_and_is_unbiased():
    # one key and value head broadcast to every query head without enable_gqa, as Falcon calls it
    torch.manual_seed(0)
    q = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, 5, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 1, 5, 4, dtype=torch.float64, requires_grad=True)
    config = SketchConfig(method="quantize", bits=2)
    with radgrad.memory.record() as rec:
        out = RF.scaled_dot_product_attention(q, k, v, is_causal=True, config=config)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))  # torch's broadcast call
    assert rec.total <= (q.numel() + k.numel()) * 8 + v.numel() * 8 / 4
    exact = _grads(lambda *t: F.scaled_dot_product_attention(*t, is_causal=True), q, k, v)
    samples = _draws(lambda *t: RF.scaled_dot_product_attention(*t, is_causal=True, config=config), [q, k, v], 2000)
    n_v = v.numel()
    assert_same_up_to_rounding(samples[:, -n_v:], exact[-n_v:].expand(samples.shape[0], -1))  # value grad exact
    assert_unbiased(samples[:, :-n_v], exact[:-n_v])


class _TorchFunctions(nn.Module):
    """Elementwise torch functions as a model's own code calls them (Mamba's ``exp`` and
    ``softplus``), one of them on a parameter."""

    def __init__(self):
        super().__init__()
        self.log_rate = nn.Parameter(torch.linspace(-1, 1, 64, dtype=torch.float64))

    def forward(self, x):
        rate = torch.exp(self.log_rate)  # a parameter's transform: nothing to gain, kept exact
        h = torch.exp(x - rate) + x.tanh() + torch.sigmoid(x)
        return F.softplus(h, beta=2.0) + F.softplus(x)


def test_torch_elementwise_functions_are_routed_exact_forward_unbiased_gradients():
    torch.manual_seed(0)
    plain = _TorchFunctions()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model's own code, with its own parameter: routed, nothing to warn of
        model = radgrad.convert(_TorchFunctions(), method="quantize")
    x = torch.randn(16, 64, dtype=torch.float64, requires_grad=True)
    report = radgrad.coverage(model, x)
    assert report.routed == [""] and report.exact == {} and report.parameter_share == 1.0
    assert torch.equal(model(x), plain(x))
    saved, exact_saved = (radgrad.memory.measure(m, x).total for m in (model, plain))
    assert saved < exact_saved / 4
    exact = _grads(lambda *t: plain(t[0]), x, plain.log_rate)
    draws = _draws(lambda *t: model(t[0]), [x, model.log_rate], N_QUANTIZED)
    assert_unbiased(draws, exact)
    # the parameter's own exp stays torch's: the share of its gradient through it is not estimated
    rate_only = lambda m: torch.exp(m.log_rate).sum()  # noqa: E731
    assert torch.equal(torch.autograd.grad(rate_only(model), model.log_rate)[0],
                       torch.autograd.grad(rate_only(plain), plain.log_rate)[0])


class _FunctionalConv(nn.Module):
    """A convolution (or a transposed one) whose weight a model transforms before calling
    ``F.conv2d`` (weight standardization)."""

    def __init__(self, transposed):
        super().__init__()
        self.transposed = transposed
        self.weight = nn.Parameter(torch.randn(4, 2, 3, 3, dtype=torch.float64))

    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True))
        return F.conv_transpose2d(x, w.transpose(0, 1), None, 1, 1) if self.transposed else F.conv2d(x, w, None, 1, 1)


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "conv_transpose"])
def test_functional_convolutions_are_routed_and_exact_layers_stay_exact(transposed):
    torch.manual_seed(0)
    model = radgrad.convert(nn.Sequential(_FunctionalConv(transposed), nn.Conv2d(4, 4, 3, padding=1).double(),
                                          nn.Flatten(), nn.Linear(1024, 2).double()), method="quantize")
    x = torch.randn(8, 2, 16, 16, dtype=torch.float64)
    plain = radgrad.memory.measure(nn.Conv2d(2, 4, 3, padding=1).double(), x).total
    model[1].sketch = SketchConfig(1.0)  # made exact by hand, as radgrad.allocate may
    saved = radgrad.memory.measure(model, x).by_module
    assert saved["0"] < plain / 4  # routed: a 2-bit sketch of its input
    assert saved["1"] == 2 * plain  # exact: its input, twice the channels of the first layer's
    # the routed call is radgrad.functional's own, under the same draw
    torch.manual_seed(1)
    (routed,) = torch.autograd.grad(model(x).sum(), model[0].weight)
    torch.manual_seed(1)
    w = model[0].weight
    w = w - w.mean((1, 2, 3), keepdim=True)
    config = SketchConfig(method="quantize")
    direct = (RF.conv_transpose(x, w.transpose(0, 1), None, 1, 1, config=config) if transposed else
              RF.conv(x, w, None, 1, 1, config=config))
    (want,) = torch.autograd.grad(model[3](model[2](model[1](direct))).sum(), model[0].weight)
    assert torch.equal(routed, want)
