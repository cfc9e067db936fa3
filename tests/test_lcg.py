"""Tests of radgrad.lcg: exact gradients on the LCG, unbiased estimators, stored-value counts, errors.

Statistical tests use fixed seeds and compare a Monte Carlo mean with the exact
gradient within 5 standard errors *measured from the same samples*, per
component (``problems.assert_unbiased``, which also checks that a 10% bias of
the estimated components would be caught). The means are over many
independent estimates (or over batch means of many paths), so by the central
limit theorem ``(mean - exact) / SE`` is close to a t-distribution with dozens
of degrees of freedom: a 5-SE deviation has probability below 1e-5 per
component, so a failure points at a bias, not bad luck; a biased estimator
(e.g. a sketch without the D/k rescaling) fails by far more than 5 SE.
Components whose samples are all equal (SE = 0, e.g. an exact-zero gradient)
must match to round-off.
"""

from __future__ import annotations

import math

import problems
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from radgrad.lcg import LCG, Injection, trace
from radgrad.lcg.jacobians import Elementwise, MatMul, Reduce

K_SE = problems.Z_BOUND
M, N = 2, 3
DT = torch.float64


# --- random programs ------------------------------------------------------------------

UNARY = ["tanh", "relu", "exp", "neg", "scale", "sum", "sum0", "sum1", "matmul", "matmul_t"]
BINARY = ["add", "sub", "mul"]


def run_program(program, x, w, b):
    """Apply ``program`` (a list of (op, i, j, c)) to a pool that starts as [x, b]; return the last value."""
    pool = [x, b]
    for op, i, j, c in program:
        p, q = pool[i % len(pool)], pool[j % len(pool)]
        if op == "add":
            r = p + q
        elif op == "sub":
            r = p - q
        elif op == "mul":
            r = p * q
        elif op == "tanh":
            r = torch.tanh(p)
        elif op == "relu":
            r = torch.relu(p)
        elif op == "exp":
            r = torch.exp(0.25 * p)
        elif op == "neg":
            r = -p
        elif op == "scale":
            r = c * p + 0.5
        elif op == "sum":
            r = p.sum()
        elif op == "sum0":
            r = p.sum(dim=0, keepdim=True) if p.dim() else p
        elif op == "sum1":
            r = p.sum(dim=-1, keepdim=True) if p.dim() else p
        elif op == "matmul":
            r = p.expand(M, N) @ w
        else:  # matmul_t
            r = p.expand(M, N) @ w.t()
        pool.append(r)
    return pool[-1]


programs = st.lists(
    st.tuples(
        st.sampled_from(UNARY + BINARY),
        st.integers(0, 10),
        st.integers(0, 10),
        st.floats(-2.0, 2.0, allow_nan=False),
    ),
    min_size=1,
    max_size=6,
)


def make_inputs(seed: int, dtype: torch.dtype = DT) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        (torch.rand(shape, generator=gen, dtype=dtype) * 2 - 1) for shape in [(M, N), (N, N), (N,)]
    )


def autograd(fn, inputs, cotangent=None):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    grad_out = torch.ones_like(out) if cotangent is None else cotangent
    return torch.autograd.grad(out, leaves, grad_out, allow_unused=True, materialize_grads=True)


def assert_exact(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        scale = max(1.0, float(w.abs().max())) if w.numel() else 1.0
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10 * scale)


def assert_unbiased(samples: list[tuple[torch.Tensor, ...]], exact: tuple[torch.Tensor, ...]):
    """The sample mean of the gradients (every input's, flattened into one vector) lies within
    Z_BOUND measured standard errors of ``exact``, with the shared power check."""
    flat = torch.stack([torch.cat([g.reshape(-1) for g in sample]) for sample in samples])
    problems.assert_unbiased(flat, torch.cat([g.reshape(-1) for g in exact]))


# --- exact: gradient and Bauer's formula ------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs, seed=st.integers(0, 2**31 - 1))
def test_gradient_and_path_sum_match_autograd(program, seed):
    inputs = make_inputs(seed)
    fn = lambda x, w, b: run_program(program, x, w, b)  # noqa: E731
    out = fn(*inputs)
    assume(bool(torch.isfinite(out).all()) and float(out.abs().max()) < 1e6)
    graph = trace(fn, *inputs)
    want = autograd(fn, inputs)
    assert_exact(graph.gradient(), want)
    assume(graph.count_paths() <= 20_000)
    assert_exact(graph.path_sum(), want)


def f_everything(x, w, b, v, a):
    """Every supported op family at least once, including mv, dot, bmm, views, mean, div."""
    h = torch.tanh(x @ w + b)
    s = torch.relu(h) * 2.0 + 1.0 - h
    s = (s / 3.0 + s / (v + 2.0)).sum(dim=0)
    z = v @ w + (w @ v).sum() + (v @ v) + torch.sigmoid(-v)
    y = (2.0 - x).t().reshape(-1).mean() + x.transpose(0, 1).permute(1, 0).sum()
    c = torch.ones(3, dtype=x.dtype)  # a constant made inside fn
    bat = torch.bmm(a, a.transpose(1, 2)).sum(dim=(1, 2))
    gated = (x > 0).to(x.dtype) * x.detach() * x  # comparisons and detach are constants
    return (s * c + z).exp().sum() + y + bat.sum() + gated.sum()


def everything_inputs():
    gen = torch.Generator().manual_seed(3)
    shapes = [(2, 3), (3, 3), (3,), (3,), (2, 2, 3)]
    return tuple(torch.randn(s, generator=gen, dtype=DT) * 0.5 for s in shapes)


def test_all_supported_ops_match_autograd():
    inputs = everything_inputs()
    graph = trace(f_everything, *inputs)
    want = autograd(f_everything, inputs)
    assert_exact(graph.gradient(), want)
    assert_exact(graph.path_sum(), want)


def test_tensor_output_and_cotangent():
    fn = lambda x, w: torch.tanh(x @ w)  # noqa: E731
    x, w, _ = make_inputs(0)
    cot = torch.randn(M, N, dtype=DT)
    assert_exact(trace(fn, x, w).gradient(), autograd(fn, (x, w)))
    graph = trace(fn, x, w, cotangent=cot)
    assert_exact(graph.gradient(), autograd(fn, (x, w), cot))
    assert_exact(graph.path_sum(), autograd(fn, (x, w), cot))


def test_float32_gradient_keeps_dtype():
    x, w, b = (t.float() for t in make_inputs(1))
    fn = lambda x, w: torch.tanh(x @ w).sum()  # noqa: E731
    got = trace(fn, x, w).gradient()
    want = autograd(fn, (x, w))
    for g, t in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, t)


def test_jacobians_are_structured():
    x, w, _ = make_inputs(2)
    graph = trace(lambda x, w: torch.tanh(x @ w).sum(dim=1), x, w)
    kinds = {graph.vertices[e.dst].op: type(e.jacobian) for e in graph.edges}
    assert kinds == {"mm": MatMul, "tanh": Elementwise, "sum": Reduce}
    (tanh_edge,) = [e for e in graph.edges if graph.vertices[e.dst].op == "tanh"]
    assert tanh_edge.jacobian.stored.shape == (M, N)  # a vector per entry, not an (MN x MN) matrix
    mm_w = [e for e in graph.edges if graph.vertices[e.src].name.startswith("w")]
    assert torch.equal(mm_w[0].jacobian.stored, x)  # d(x @ w)/dw keeps x
    assert isinstance(graph, LCG) and len(graph.vertices) == 5


def test_unreachable_vertices_are_dropped():
    x = torch.randn(3, dtype=DT)
    graph = trace(lambda x, y: (torch.exp(x), torch.tanh(x).sum())[1], x, x.clone())
    assert [v.op for v in graph.vertices] == ["input", "input", "tanh", "sum"]
    assert torch.equal(graph.gradient()[1], torch.zeros(3, dtype=DT))


def test_count_paths_of_a_dense_layer():
    x, w, _ = make_inputs(4)
    graph = trace(lambda x, w: (x @ w).sum(), x, w)
    # x[i, k] reaches out[i, j] for every j (N paths), w[k, j] reaches out[i, j] for every i (M).
    assert graph.count_paths() == M * N * N + N * N * M


# --- estimators: unbiasedness ------------------------------------------------------------------


def f_mc(x, w, b):
    h = torch.tanh(x @ w + b)
    return (torch.relu(h - 0.1) * torch.exp(0.5 * x) + h * x).sum(dim=1)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("mode", ["uniform", "magnitude"])
def test_sample_paths_is_unbiased(mode, direction):
    inputs = make_inputs(5)
    graph = trace(f_mc, *inputs)
    torch.manual_seed(0)
    # 80 batch means of many paths each: nearly Gaussian, so the SE is reliable. Reverse sampling
    # needs 1000 paths a batch for a 10% bias to sit 6 standard errors out (1.7-3.1 with 100)
    paths = 1000 if direction == "reverse" else 100
    batches = [graph.sample_paths(paths, mode=mode, direction=direction) for _ in range(80)]
    assert_unbiased(batches, autograd(f_mc, inputs))


# Draws each: enough for a 10% bias to sit 6 or more standard errors out (rows of 3 values, 2 kept).
INJECT_DRAWS = {"sample": 2000, "project": 3500}


@pytest.mark.parametrize(
    "method,per_example", [("sample", True), ("sample", False), ("project", True), ("project", False)]
)
def test_inject_is_unbiased(method, per_example):
    inputs = make_inputs(6)
    graph = trace(f_mc, *inputs)
    torch.manual_seed(1)
    samples = [graph.inject(0.5, method=method, per_example=per_example).gradient
               for _ in range(INJECT_DRAWS[method])]
    assert_unbiased(samples, autograd(f_mc, inputs))


def test_inject_at_some_vertices_is_unbiased():
    inputs = make_inputs(7)
    graph = trace(f_mc, *inputs)
    torch.manual_seed(2)
    samples = [graph.inject(0.3, at=["tanh", 5]).gradient for _ in range(2000)]
    assert_unbiased(samples, autograd(f_mc, inputs))


def test_a_biased_estimator_fails_the_check(monkeypatch):
    """The check has power: sketches without the D/k rescaling (a fault the paper notes) fail it."""
    from radgrad.lcg import estimators
    from radgrad.sketch import unpack

    def unscaled(sketch):
        d = sketch.shape[-1] if sketch.shape else 1
        return unpack(sketch) * (sketch.values.shape[-1] / d)

    monkeypatch.setattr(estimators, "unpack", unscaled)
    inputs = make_inputs(6)
    graph = trace(f_mc, *inputs)
    torch.manual_seed(1)
    samples = [graph.inject(0.4).gradient for _ in range(600)]
    with pytest.raises(AssertionError, match="z-score"):
        assert_unbiased(samples, autograd(f_mc, inputs))


def test_independent_paths_are_sampled_exactly_forward():
    """A chain of elementwise ops has one path per input entry: forward sampling is exact."""
    x = torch.randn(5, dtype=DT)
    fn = lambda x: torch.tanh(torch.exp(0.3 * x) * torch.arange(5.0, dtype=DT)).sum()  # noqa: E731
    graph = trace(fn, x)
    torch.manual_seed(0)
    assert_exact(graph.sample_paths(1, direction="forward"), autograd(fn, (x,)))


def test_keep_one_is_exact():
    inputs = make_inputs(8)
    graph = trace(f_mc, *inputs)
    result = graph.inject(1.0)
    assert isinstance(result, Injection)
    assert result.stored == result.exact
    assert_exact(result.gradient, autograd(f_mc, inputs))


def test_estimators_are_reproducible_from_the_torch_seed():
    graph = trace(f_mc, *make_inputs(9))
    draws = []
    for _ in range(2):
        torch.manual_seed(123)
        draws.append((graph.sample_paths(7, mode="magnitude"), graph.inject(0.3).gradient))
    for a, b in zip(draws[0], draws[1]):
        for s, t in zip(a, b):
            assert torch.equal(s, t)


# --- estimators: stored-value counts -------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.05, 0.1, 0.26, 0.5, 0.94, 1.0])
@pytest.mark.parametrize("method", ["sample", "project"])
def test_inject_counts_k_per_stored_row(keep, method):
    x = torch.randn(4, 10, dtype=DT)
    graph = trace(lambda x: torch.tanh(x).sum(), x)  # one stored (4, 10) tensor: tanh's derivative
    result = graph.inject(keep, method=method)
    assert result.exact == 40
    assert result.stored == 4 * max(1, round(keep * 10))


@pytest.mark.parametrize("method", ["quantize", "norm"])
def test_inject_takes_the_estimators_whose_values_it_counts(method):
    graph = trace(lambda x: torch.tanh(x).sum(), torch.randn(4, 10, dtype=DT))
    with pytest.raises(ValueError, match=f"radgrad.lcg: method must be 'sample' or 'project' .*got '{method}'"):
        graph.inject(1.0, method=method)


def test_inject_counts_matmul_operands_and_respects_at():
    x, w = torch.randn(4, 10, dtype=DT), torch.randn(10, 5, dtype=DT)
    graph = trace(lambda x, w: torch.tanh(x @ w).sum(), x, w)
    # mm stores w (10 rows of 5) for dx and x (4 rows of 10) for dw; tanh stores a (4, 5) vector.
    full = graph.inject(0.3)
    assert full.exact == 50 + 40 + 20
    assert full.stored == 10 * 2 + 4 * 3 + 4 * 2
    only_tanh = graph.inject(0.3, at=["tanh"])
    assert only_tanh.stored == 50 + 40 + 4 * 2


# --- errors ------------------------------------------------------------------------------------


def test_unsupported_op_is_named():
    with pytest.raises(NotImplementedError, match=r"radgrad.lcg: no local Jacobian for aten.sin"):
        trace(lambda x: torch.sin(x).sum(), torch.randn(3))


@pytest.mark.parametrize(
    "args,match",
    [
        ((), "trace needs at least one input"),
        ((torch.arange(3),), "input 0 must be a floating-point tensor, got torch.int64"),
        ((3.0,), "input 0 must be a floating-point tensor, got float"),
    ],
)
def test_bad_inputs(args, match):
    with pytest.raises(TypeError, match=f"radgrad.lcg: {match}"):
        trace(lambda *xs: xs[0].sum(), *args)


def test_bad_outputs():
    x = torch.randn(3)
    with pytest.raises(TypeError, match="radgrad.lcg: fn must return a single tensor"):
        trace(lambda x: (x.sum(), x.sum()), x)
    with pytest.raises(ValueError, match="radgrad.lcg: the output of fn does not depend"):
        trace(lambda x: torch.ones(2), x)
    with pytest.raises(ValueError, match=r"radgrad.lcg: cotangent must be .* shape \(3,\)"):
        trace(lambda x: x * 2, x, cotangent=torch.ones(2))


def test_path_sum_refuses_too_many_paths():
    x, w = torch.randn(1, 8, dtype=DT), torch.randn(8, 8, dtype=DT)
    fn = lambda x, w: torch.tanh(torch.tanh(torch.tanh(x @ w) @ w) @ w).sum()  # noqa: E731
    graph = trace(fn, x, w)
    with pytest.raises(ValueError, match=r"radgrad.lcg: path_sum would enumerate \d+ scalar paths"):
        graph.path_sum(max_paths=1000)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n": 0}, "n must be a positive int"),
        ({"n": 2.0}, "n must be a positive int"),
        ({"n": 2, "mode": "greedy"}, "mode must be one of"),
        ({"n": 2, "direction": "up"}, "direction must be one of"),
    ],
)
def test_sample_paths_errors(kwargs, match):
    graph = trace(lambda x: torch.tanh(x).sum(), torch.randn(3))
    with pytest.raises(ValueError, match=f"radgrad.lcg: {match}"):
        graph.sample_paths(**kwargs)


def test_inject_errors():
    graph = trace(lambda x: torch.tanh(x).sum(), torch.randn(3))
    with pytest.raises(ValueError, match="radgrad.lcg: no vertex 'nope'"):
        graph.inject(0.5, at=["nope"])
    with pytest.raises(ValueError, match="radgrad.lcg: cannot inject at input vertex"):
        graph.inject(0.5, at=[0])
    with pytest.raises(TypeError, match="radgrad.lcg: at must be an iterable"):
        graph.inject(0.5, at="tanh")
    with pytest.raises(ValueError, match="keep must be in"):
        graph.inject(0.0)
    with pytest.raises(ValueError, match="radgrad.lcg: method must be 'sample' or 'project'.*got 'dropout'"):
        graph.inject(0.5, method="dropout")


# --- the variance study ------------------------------------------------------------------------


def test_exact_variances_match_closed_forms_on_independent_paths():
    from radgrad.lcg.variance import build, inject_relvar, path_sampling_relvar

    width, keep = 6, 0.5
    k = max(1, round(keep * width))
    per_factor = 1 + (width - 1) / k  # E[c^2] of one sketched entry
    for depth in (1, 3):
        graph = build("independent", depth, width, seed=1)
        last_tanh = [len(graph.vertices) - 2]
        for mode in ("uniform", "magnitude"):
            assert path_sampling_relvar(graph, mode) == pytest.approx(width - 1, rel=1e-12)
        assert inject_relvar(graph, keep) == pytest.approx(per_factor ** (2 * depth) - 1, rel=1e-12)
        assert inject_relvar(graph, keep, at=last_tanh) == pytest.approx(per_factor - 1, rel=1e-12)
        assert inject_relvar(graph, 1.0) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("estimator", ["paths-uniform", "paths-magnitude", "inject-sample"])
def test_exact_variances_match_monte_carlo_on_interleaved_paths(estimator):
    from radgrad.lcg.variance import build, inject_relvar, path_sampling_relvar

    graph = build("interleaved", 2, 4, seed=2)
    g = graph.gradient()[0]
    if estimator == "inject-sample":
        exact, draw = inject_relvar(graph, 0.5), lambda: graph.inject(0.5).gradient[0]
    else:
        mode = estimator.removeprefix("paths-")
        exact, draw = path_sampling_relvar(graph, mode), lambda: graph.sample_paths(1, mode=mode)[0]
    torch.manual_seed(3)
    errs = torch.tensor([float((draw() - g).pow(2).sum() / g.pow(2).sum()) for _ in range(1500)])
    se = float(errs.std()) / math.sqrt(len(errs))
    assert abs(float(errs.mean()) - exact) <= K_SE * se


def test_exact_injection_variance_needs_a_chain():
    from radgrad.lcg.variance import inject_relvar

    graph = trace(f_mc, *make_inputs(10))
    with pytest.raises(NotImplementedError, match="radgrad.lcg: exact injection variance needs one edge"):
        inject_relvar(graph, 0.5)


def test_variance_cli_writes_outputs(tmp_path):
    import argparse

    from radgrad.experiments import lcg_cli

    parser = argparse.ArgumentParser()
    lcg_cli.add_arguments(parser)
    args = parser.parse_args(
        ["--out", str(tmp_path), "--seed", "1", "--width", "3", "--max-depth", "2", "--reps", "4", "--paths", "2"]
    )
    assert lcg_cli.run(args) == 0
    for ext in ("png", "csv", "md"):
        assert (tmp_path / f"lcg_variance.{ext}").stat().st_size > 0
    text = (tmp_path / "lcg_variance.md").read_text()
    assert "seed=1" in text and "--seed 1" in text
    bad = parser.parse_args(["--out", str(tmp_path), "--keep", "0"])
    assert lcg_cli.run(bad) == 2
