import copy

import pytest
import torch
from torch import nn

import radgrad
from problems import assert_unbiased

CONFIGS = [(m, pe) for m in radgrad.METHODS for pe in (True, False)]
SAMPLES = 3000


def _problem(nonlinearity="relu", layers=2, seed=0):
    torch.manual_seed(seed)
    rnn = nn.RNN(3, 4, num_layers=layers, nonlinearity=nonlinearity).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)  # (T, B, features)
    h0 = 0.1 * torch.randn(layers, 2, 4, dtype=torch.float64)
    return rnn, x, h0


def _grads(rnn, x, h0):
    """Gradients of a loss that uses every output and the last states: x, h0, then the parameters."""
    x, h0 = x.clone().requires_grad_(), h0.clone().requires_grad_()
    out, h_n = rnn(x, h0)
    loss = out.square().sum() + h_n.sin().sum()
    return torch.autograd.grad(loss, [x, h0, *rnn.parameters()])


@pytest.mark.parametrize("nonlinearity", ["relu", "tanh"])
def test_recurrence_without_sketching_equals_torch_float64(nonlinearity):
    rnn, x, h0 = _problem(nonlinearity, layers=1)
    params = [x.requires_grad_(), h0.requires_grad_(), *rnn.parameters()]
    out, h_n = rnn(x, h0)
    expected = torch.autograd.grad(out.square().sum() + h_n.sin().sum(), params)
    v = nn.functional.linear(x, rnn.weight_ih_l0, rnn.bias_ih_l0) + rnn.bias_hh_l0
    rad_out, rad_last = radgrad.functional.recurrence(v, h0[0], rnn.weight_hh_l0, nonlinearity,
                                                      radgrad.SketchConfig(1.0))
    got = torch.autograd.grad(rad_out.square().sum() + rad_last.sin().sum(), params)
    torch.testing.assert_close(rad_out, out, rtol=0, atol=1e-12)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_keep_one_runs_torch_itself():
    rnn, x, h0 = _problem()
    expected = _grads(rnn, x, h0)
    radgrad.convert(rnn, keep=1.0)
    assert all(torch.equal(a, b) for a, b in zip(_grads(rnn, x, h0), expected))


@pytest.mark.parametrize("nonlinearity,method,per_example",
                         [("relu", m, pe) for m, pe in CONFIGS] + [("tanh", "sample", True)])
def test_weight_gradients_are_unbiased(nonlinearity, method, per_example):
    rnn, x, h0 = _problem(nonlinearity)
    exact = torch.cat([g.reshape(-1) for g in _grads(rnn, x, h0)[2:]])
    radgrad.convert(rnn, keep=0.3, method=method, per_example=per_example)
    torch.manual_seed(1)
    samples = torch.stack([torch.cat([g.reshape(-1) for g in _grads(rnn, x, h0)[2:]])
                           for _ in range(SAMPLES)])
    assert_unbiased(samples, exact)


@pytest.mark.parametrize("nonlinearity", ["relu", "tanh"])
def test_outputs_input_state_and_bias_gradients_are_exact(nonlinearity):
    # Not bitwise: torch's RNN kernel adds the two biases in another order, so
    # the tolerance is a few float64 roundings.
    rnn, x, h0 = _problem(nonlinearity)
    expected_out = rnn(x, h0)
    expected = _grads(rnn, x, h0)
    radgrad.convert(rnn, keep=0.2)
    for a, b in zip(rnn(x, h0), expected_out):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    got = _grads(rnn, x, h0)
    names = ["x", "h0", *(n for n, _ in rnn.named_parameters())]
    for name, a, b in zip(names, got, expected):
        if name in ("x", "h0") or name.startswith("bias"):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)


def test_smnist_irnn_memory_is_the_sketches_bits_and_input():
    model = radgrad.models.smnist_irnn()
    x = torch.rand(150, 784)
    exact = radgrad.memory.saved_bytes(model, x)
    radgrad.convert(model, keep=0.1)
    rad = radgrad.memory.measure(model, x)
    steps, batch, hidden = 784, 150, 100
    expected = {
        # 10 of 100 state entries per step and example with an int16 row base, 10 int16
        # offsets per chunk of 64 steps (13 chunks), 1 bit per ReLU entry, and the
        # one-pixel input (a row of D=1 is stored exactly)
        "rnn": steps * batch * (10 * 4 + 2 + 4) + 13 * 10 * 2 + steps * batch * hidden // 8,
        "head": batch * 10 * 4 + (batch + 10) * 2,
    }
    assert rad.by_module == expected
    assert rad.total / exact < 0.15


def test_batch_first_unbatched_no_bias_and_dropout():
    torch.manual_seed(0)
    rnn = radgrad.nn.RNN(3, 4, num_layers=2, batch_first=True, bias=False, dropout=0.5,
                         nonlinearity="relu", keep=0.5)
    out, h_n = rnn(torch.randn(2, 6, 3))
    assert out.shape == (2, 6, 4) and h_n.shape == (2, 2, 4)
    (out.sum() + h_n.sum()).backward()
    assert all(p.grad is not None for p in rnn.parameters())
    out, h_n = rnn(torch.randn(6, 3))
    assert out.shape == (6, 4) and h_n.shape == (2, 4)
    twin = nn.RNN(3, 4, num_layers=2, batch_first=True, bias=False)
    assert twin.state_dict().keys() == rnn.state_dict().keys()


def test_convert_handles_rnn_and_skips_bidirectional():
    model = nn.Sequential(nn.RNN(2, 3))
    assert type(radgrad.convert(model)[0]) is radgrad.nn.RNN
    bidirectional = nn.RNN(2, 3, bidirectional=True)
    assert type(radgrad.convert(bidirectional)) is nn.RNN
    with pytest.raises(ValueError, match="bidirectional=True is not supported"):
        radgrad.nn.RNN(2, 3, bidirectional=True)


def test_packed_sequences_are_a_clear_error():
    rnn = radgrad.nn.RNN(2, 3)
    packed = nn.utils.rnn.pack_sequence([torch.randn(4, 2), torch.randn(2, 2)])
    with pytest.raises(TypeError, match="PackedSequence inputs are not supported"):
        rnn(packed)


def test_irnn_initialisation():
    model = radgrad.models.smnist_irnn(pixels_per_step=28)
    assert torch.equal(model.rnn.weight_hh_l0, torch.eye(100))
    assert model.rnn.bias_hh_l0.abs().sum() == 0 and model.rnn.weight_ih_l0.std() < 3e-3
    assert model(torch.rand(4, 784)).shape == (4, 10)
    clone = copy.deepcopy(model)
    assert torch.equal(clone.rnn.weight_ih_l0, model.rnn.weight_ih_l0)
