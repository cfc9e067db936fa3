import copy

import pytest
import torch
from torch import nn

import radgrad
from problems import (ESTIMATORS, assert_same_up_to_rounding, assert_unbiased, config_id, options,
                      sketched, weight_entries)

pytestmark = pytest.mark.usefixtures("one_torch_thread")




def _problem(nonlinearity="relu", layers=2, seed=0, batch=2, bidirectional=False):
    torch.manual_seed(seed)
    rnn = nn.RNN(3, 4, num_layers=layers, nonlinearity=nonlinearity, bidirectional=bidirectional).double()
    x = torch.randn(6, batch, 3, dtype=torch.float64)  # (T, B, features)
    h0 = 0.1 * torch.randn(layers * (2 if bidirectional else 1), batch, 4, dtype=torch.float64)
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


def _unrolled(rnn, x, h0):
    """The loss of :func:`_grads` from torch ops, step by step, and for each layer its input,
    its previous states h_{t-1} and its pre-activations (one tensor per step)."""
    act = torch.relu if rnn.nonlinearity == "relu" else torch.tanh
    inputs, previous, pre, last = [], [], [], []
    for layer in range(rnn.num_layers):
        w_ih, w_hh, b_ih, b_hh = (getattr(rnn, f"{name}_l{layer}")
                                  for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        v = nn.functional.linear(x, w_ih, b_ih) + b_hh
        states, steps = [h0[layer]], []
        for t in range(x.shape[0]):
            steps.append(v[t] + nn.functional.linear(states[-1], w_hh))
            states.append(act(steps[-1]))
        inputs.append(x)
        previous.append(torch.stack(states[:-1]))
        pre.append(steps)
        x = torch.stack(states[1:])
        last.append(states[-1])
    return x.square().sum() + torch.stack(last).sin().sum(), inputs, previous, pre


@pytest.mark.parametrize("chunk", [None, 4])  # default (one chunk of 6 steps), or chunks of 4 and 2
@pytest.mark.parametrize("config", ESTIMATORS, ids=config_id)
@pytest.mark.parametrize("nonlinearity", ["relu", "tanh"])
def test_weight_gradients_are_the_exact_formula_on_the_sketches(nonlinearity, config, chunk, monkeypatch):
    # Same draws (same seed): each layer's input weight gradient is torch's
    # linear weight gradient with the layer input replaced by its sketch
    # estimate, and with ReLU the recurrent one is sum_t g_t^T h_{t-1} with the
    # previous states replaced by their estimates, one draw per chunk of steps
    # (NOTE [RAD recurrence]); g_t, the gradient of the pre-activation, is
    # torch's. The draws come in the order of the forward pass: layer by layer,
    # the input then the chunks. With tanh the recurrent gradient is exact.
    if chunk is not None:
        monkeypatch.setattr(radgrad.functional._recurrence, "_RECURRENCE_CHUNK", chunk)
    chunks = [(0, 6)] if chunk is None else [(0, 4), (4, 6)]
    rnn, x, h0 = _problem(nonlinearity)
    x, h0 = x.requires_grad_(), h0.requires_grad_()
    loss, inputs, previous, pre = _unrolled(rnn, x, h0)
    flat_pre = [z for steps in pre for z in steps]
    g = torch.autograd.grad(loss, [x, h0, *rnn.parameters(), *flat_pre])
    exact, g = g[:-len(flat_pre)], torch.stack(g[-len(flat_pre):]).split(x.shape[0])
    radgrad.convert(rnn, **options(config))
    torch.manual_seed(1)
    got = dict(zip(["x", "h0", *(n for n, _ in rnn.named_parameters())], _grads(rnn, x, h0)))
    torch.manual_seed(1)
    for layer in range(rnn.num_layers):
        w_ih, w_hh = getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"weight_hh_l{layer}")
        estimate = sketched(inputs[layer].detach(), config, batch_dims=2)
        states = previous[layer].detach()
        if nonlinearity == "relu":
            states = torch.cat([sketched(states[lo:hi], config, batch_dims=2) for lo, hi in chunks])
            assert not torch.equal(states, previous[layer])
        for name, weight, sketch in [("weight_ih", w_ih, estimate), ("weight_hh", w_hh, states)]:
            (formula,) = torch.autograd.grad(nn.functional.linear(sketch, weight), weight, g[layer])
            assert_same_up_to_rounding(got[f"{name}_l{layer}"], formula)
    # and everything else as torch computes it, up to the order of additions
    for a, b in zip([got["x"], got["h0"]], exact[:2]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for (name, _), b in zip(rnn.named_parameters(), exact[2:]):
        if name.startswith("bias"):
            torch.testing.assert_close(got[name], b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("config", [radgrad.SketchConfig(0.3, "sample"), radgrad.SketchConfig(method="quantize", bits=1),
                                    radgrad.SketchConfig(0.3, "norm")], ids=config_id)
def test_weight_gradients_are_unbiased(config):
    # End to end, statistically: two layers, sketched inputs and states, the
    # paper's sampling, the coarsest quantization and norm sampling (every
    # config is checked deterministically above). Weights only:
    # the biases are exact (up to torch's order of additions), asserted draw by
    # draw. Draws: enough for the power check, a 10% bias caught; 8 examples,
    # not 2: a sample estimate of a sum over more rows varies less. (Not
    # "project": a projection is exact on a one-hot row, which ReLU states
    # often are, and an entry that never varies would pass the power check alone.)
    rnn, x, h0 = _problem("relu", batch=8)
    exact = torch.cat([g.reshape(-1) for g in _grads(rnn, x, h0)[2:]])
    weights = weight_entries(rnn)
    radgrad.convert(rnn, **options(config))
    torch.manual_seed(1)
    samples = torch.stack([torch.cat([g.reshape(-1) for g in _grads(rnn, x, h0)[2:]]) for _ in range(600)])
    torch.testing.assert_close(samples[:, ~weights], exact[~weights].expand(len(samples), -1), rtol=0, atol=1e-12)
    assert_unbiased(samples[:, weights], exact[weights])


@pytest.mark.parametrize("nonlinearity,bidirectional", [("relu", False), ("tanh", False), ("relu", True)])
def test_outputs_input_state_and_bias_gradients_are_exact(nonlinearity, bidirectional):
    # Not bitwise: torch's RNN kernel adds the two biases in another order, so
    # the tolerance is a few float64 roundings.
    rnn, x, h0 = _problem(nonlinearity, bidirectional=bidirectional)
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


def test_convert_handles_rnn_bidirectional_too():
    model = nn.Sequential(nn.RNN(2, 3))
    assert type(radgrad.convert(model)[0]) is radgrad.nn.RNN
    assert type(radgrad.convert(nn.RNN(2, 3, bidirectional=True))) is radgrad.nn.RNN


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


def test_zero_time_steps_is_a_clear_error():
    rnn = radgrad.convert(torch.nn.RNN(3, 4), keep=0.1)
    with pytest.raises(ValueError, match="radgrad.functional.recurrence: expected a sequence of at least one "
                                         "time step, got 0"):
        rnn(torch.randn(0, 2, 3))
