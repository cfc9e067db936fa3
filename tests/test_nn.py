import copy
import io
import pickle

import pytest
import torch
from torch import nn

import radgrad
from problems import (ESTIMATORS, assert_same_up_to_rounding, assert_unbiased, config_id, options, problem,
                      sample_grads, sketched, weight_entries, weight_grads)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _input_grad(model, x, y):
    x = x.clone().requires_grad_()
    nn.functional.cross_entropy(model(x), y).backward()
    return x.grad


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("method", ["sample", "norm", "project"])
def test_keep_one_equals_torch_float64(kind, method):
    model, x, y = problem(kind)
    exact = weight_grads(model, x, y)
    radgrad.convert(model, keep=1.0, method=method)
    torch.testing.assert_close(weight_grads(model, x, y), exact, rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 7), (7,)])
@pytest.mark.parametrize("config", ESTIMATORS, ids=config_id)
def test_linear_weight_gradient_is_the_exact_formula_on_the_sketch(shape, config):
    # Same draw (same seed): the RAD weight gradient is torch's linear weight
    # gradient with the input replaced by unpack(pack(input)), whose
    # unbiasedness test_sketch.py tests; output, input and bias gradients are torch's.
    torch.manual_seed(0)
    layer = radgrad.nn.Linear(7, 3, **options(config)).double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(*shape[:-1], 3, dtype=torch.float64)
    params = (x, layer.weight, layer.bias)
    expected_out = nn.functional.linear(x, layer.weight, layer.bias)
    expected = torch.autograd.grad(expected_out, params, grad)
    torch.manual_seed(1)
    out = layer(x)
    got = torch.autograd.grad(out, params, grad)
    torch.manual_seed(1)
    estimate = sketched(x.detach(), layer.sketch, batch_dims=x.dim() - 1)
    (formula,) = torch.autograd.grad(nn.functional.linear(estimate, layer.weight, layer.bias),
                                     layer.weight, grad)
    assert not torch.equal(estimate, x)  # randomized: k = 2 of 7 entries per row, or rounded
    assert torch.equal(out, expected_out)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[2], expected[2])
    assert_same_up_to_rounding(got[1], formula)


# End to end, statistically: the composition of layers, a paper's and a newer
# sketch config per model (every op and config is checked deterministically above and in
# test_functional.py). Weights only: bias gradients are exact, asserted
# draw by draw. Draws: enough for the power check, a 10% bias caught.
END_TO_END = {("mlp", "paper"): (radgrad.SketchConfig(0.3, "sample", True), 1500),
              ("conv", "paper"): (radgrad.SketchConfig(0.3, "project", False), 1000),
              ("mlp", "beyond"): (radgrad.SketchConfig(method="quantize", bits=1), 1000),
              ("conv", "beyond"): (radgrad.SketchConfig(0.3, "norm", bits=1), 1000)}


@pytest.mark.parametrize("kind,which", list(END_TO_END), ids=lambda v: v)
def test_weight_gradients_are_unbiased(kind, which):
    config, n = END_TO_END[kind, which]
    model, x, y = problem(kind)
    if kind == "mlp":  # 16 examples, not 4: a sample estimate of a sum over more rows varies less
        g = torch.Generator().manual_seed(0)
        x = torch.randn(16, 7, dtype=torch.float64, generator=g)
        y = torch.randint(3, (16,), generator=g)
    exact = weight_grads(model, x, y)
    radgrad.convert(model, **options(config))
    torch.manual_seed(1)
    samples = sample_grads(model, x, y, n)
    weights = weight_entries(model)
    assert torch.equal(samples[:, ~weights], exact[~weights].expand(n, -1))
    assert_unbiased(samples[:, weights], exact[weights])


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("config", ESTIMATORS, ids=config_id)
def test_input_and_bias_gradients_are_exact(kind, config):
    model, x, y = problem(kind)
    exact_input = _input_grad(model, x, y)
    exact_bias = [m.bias.grad.clone() for m in model if hasattr(m, "bias")]
    radgrad.convert(model, **options(config))
    model.zero_grad()
    assert torch.equal(_input_grad(model, x, y), exact_input)
    assert all(torch.equal(m.bias.grad, b) for m, b in zip([m for m in model if hasattr(m, "bias")], exact_bias))


def test_same_seed_same_gradients_bitwise():
    model, x, y = problem("conv")
    radgrad.convert(model, keep=0.2)
    torch.manual_seed(5)
    a = weight_grads(model, x, y)
    torch.manual_seed(5)
    b = weight_grads(model, x, y)
    c = weight_grads(model, x, y)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_eval_no_grad_and_frozen_weights_run_torch_itself():
    model, x, y = problem("conv")
    rad = radgrad.convert(copy.deepcopy(model), keep=0.1)
    rad.eval()
    assert torch.equal(rad(x), model(x))
    rad.train()
    with torch.no_grad():
        assert torch.equal(rad(x), model(x))
    linear = radgrad.nn.Linear(4, 3, keep=0.1).requires_grad_(False)
    out = linear(torch.randn(2, 4, requires_grad=True))
    assert type(out.grad_fn).__name__ == "AddmmBackward0"
    linear.weight.requires_grad_(True)
    name = linear(torch.randn(2, 4)).grad_fn.name()
    assert name == "_LinearBackward" or "SampledLinear" in name  # the compiled node on the CPU


def test_layers_take_torch_arguments_and_state_dicts():
    conv = radgrad.nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False, keep=0.2, method="project")
    twin = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
    assert conv.state_dict().keys() == twin.state_dict().keys()
    twin.load_state_dict(conv.state_dict())
    assert conv.sketch == radgrad.SketchConfig(0.2, "project", True)
    assert "keep=0.2, method='project'" in repr(conv)
    linear = radgrad.nn.Linear(3, 2, keep=0.5)
    clone = pickle.loads(pickle.dumps(linear))
    assert clone.sketch == linear.sketch and torch.equal(clone.weight, linear.weight)
    buffer = io.BytesIO()
    torch.save(linear.state_dict(), buffer)
    buffer.seek(0)
    nn.Linear(3, 2).load_state_dict(torch.load(buffer))


def test_conv1d_unbatched_and_linear_3d_inputs():
    torch.manual_seed(0)
    conv = radgrad.nn.Conv1d(2, 3, 3, padding="same", keep=0.5)
    x = torch.randn(2, 9, requires_grad=True)
    out = conv(x)
    assert out.shape == (3, 9)
    out.sum().backward()
    assert conv.weight.grad.shape == conv.weight.shape
    linear = radgrad.nn.Linear(5, 2, keep=0.4)
    linear(torch.randn(3, 4, 5)).sum().backward()
    assert linear.weight.grad.shape == (2, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtypes(dtype):
    torch.manual_seed(0)
    model = radgrad.convert(radgrad.models.cifar_convnet().to(dtype), keep=0.1)
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    out = model(x)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert all(p.grad.dtype == dtype and p.grad.isfinite().all() for p in model.parameters())


def test_cpu_autocast_runs_in_bfloat16_like_torch():
    torch.manual_seed(0)
    model = radgrad.models.mnist_mlp()
    x = torch.rand(4, 784)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
    radgrad.convert(model, keep=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = out.float().logsumexp(1).sum()
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    loss.backward()
    assert all(p.grad.dtype == torch.float32 and p.grad.isfinite().all() for p in model.parameters())


def test_second_derivative_is_a_clear_error():
    linear = radgrad.nn.Linear(3, 2, keep=0.5)
    x = torch.randn(4, 3, requires_grad=True)
    (g,) = torch.autograd.grad(linear(x).pow(2).sum(), x, create_graph=False)
    with pytest.raises(RuntimeError, match="double backward .* not supported"):
        torch.autograd.grad(linear(x).pow(2).sum(), x, create_graph=True)


def test_second_derivative_at_keep_one_works():
    linear = radgrad.nn.Linear(3, 2, keep=1.0)
    x = torch.randn(4, 3, requires_grad=True)
    (g,) = torch.autograd.grad(linear(x).pow(2).sum(), x, create_graph=True)
    g.sum().backward()
    assert linear.weight.grad is not None


def test_integer_inputs_are_a_clear_error():
    with pytest.raises(TypeError, match=r"radgrad.functional.linear: input must be a floating-point .* got torch.int64"):
        radgrad.nn.Linear(3, 2)(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"radgrad.functional.conv: input must be a floating-point"):
        radgrad.nn.Conv2d(1, 1, 1)(torch.ones(1, 1, 2, 2, dtype=torch.int32))


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
        radgrad.nn.Linear(3, 2, keep=0)
    with pytest.raises(ValueError, match="method must be one of"):
        radgrad.nn.Conv2d(1, 1, 1, method="sparse")
    for dims in (1, 2, 3):
        with pytest.raises(ValueError, match=f"radgrad.nn.MaxPool{dims}d: return_indices=True is not supported"):
            getattr(radgrad.nn, f"MaxPool{dims}d")(2, return_indices=True)
    for made_by_convert in (radgrad.nn.Activation, radgrad.nn.RMSNormLike):
        with pytest.raises(TypeError, match=rf"radgrad.nn.{made_by_convert.__name__} is not constructed directly: "
                                            r"radgrad.convert\(model\) makes it from a module of the model"):
            made_by_convert(torch.tanh)
    # the class convert makes from a module's own class constructs as that class does
    gelu = radgrad.convert(nn.Sequential(nn.GELU()), method="quantize")[0]
    assert type(gelu)(approximate="tanh").approximate == "tanh"
