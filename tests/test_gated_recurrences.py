"""radgrad.nn.LSTM and radgrad.nn.GRU, and their recurrences (NOTE [RAD LSTM], NOTE [RAD GRU])."""

import copy

import pytest
import torch
from torch import nn

import radgrad
from problems import assert_unbiased, config_id, options

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KINDS = pytest.mark.parametrize("kind", ["LSTM", "GRU"])


def _problem(kind, layers=2, batch=3, steps=7, seed=0, **kwargs):
    torch.manual_seed(seed)
    module = getattr(nn, kind)(5, 4, num_layers=layers, **kwargs).double()
    shape = (batch, steps, 5) if kwargs.get("batch_first") else (steps, batch, 5)
    x = torch.randn(shape, dtype=torch.float64)
    directions = 2 if kwargs.get("bidirectional") else 1
    states = [0.5 * torch.randn(layers * directions, batch, 4, dtype=torch.float64)
              for _ in range(2 if kind == "LSTM" else 1)]
    return module, x, states


def _run(module, x, states):
    """The outputs, then every last state (no ``states``: torch's zeros)."""
    out, last = module(x, None if not states else tuple(states) if len(states) == 2 else states[0])
    return (out, *last) if isinstance(last, tuple) else (out, last)


def _loss(outputs):
    out, *last = outputs
    return out.square().sum() + sum((s.sin() * (k + 1)).sum() for k, s in enumerate(last))


def _grads(module, x, states):
    """Gradients of a loss that uses every output and every last state: x, the initial states, the parameters."""
    x, *states = (t.clone().requires_grad_() for t in (x, *states))
    return torch.autograd.grad(_loss(_run(module, x, states)), [x, *states, *module.parameters()])


def _flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


@KINDS
def test_recurrence_with_exact_coefficients_equals_torch_float64(kind):
    module, x, states = _problem(kind, layers=1, steps=35)  # three chunks of steps
    params = [x.requires_grad_(), *(s.requires_grad_() for s in states), *module.parameters()]
    expected_outputs = _run(module, x, states)
    expected = torch.autograd.grad(_loss(expected_outputs), params)
    exact = dict(config=radgrad.SketchConfig(1.0), coefficient_bits=None)
    if kind == "LSTM":
        v = nn.functional.linear(x, module.weight_ih_l0, module.bias_ih_l0) + module.bias_hh_l0
        outputs = radgrad.functional.lstm_recurrence(v, states[0][0], states[1][0], module.weight_hh_l0, **exact)
    else:
        v = nn.functional.linear(x, module.weight_ih_l0, module.bias_ih_l0)
        outputs = radgrad.functional.gru_recurrence(v, states[0][0], module.weight_hh_l0, module.bias_hh_l0, **exact)
    for a, b in zip(outputs, (expected_outputs[0], *(s[0] for s in expected_outputs[1:]))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)  # torch's arithmetic in another order
    got = torch.autograd.grad(_loss((outputs[0], *(s.unsqueeze(0) for s in outputs[1:]))), params)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@KINDS
@pytest.mark.parametrize("config", [radgrad.SketchConfig(method="quantize"), radgrad.SketchConfig(0.5, "sample")],
                         ids=config_id)
def test_every_gradient_is_unbiased(kind, config):
    # every gradient is estimated: the coefficients of the backward pass through time are
    # rounded at every step, the weights' also read sketches of the inputs and states;
    # bidirectional: the second layer reads both directions of the first
    module, x, states = _problem(kind, steps=12, bidirectional=True)
    exact = _flat(_grads(module, x, states))
    radgrad.convert(module, **options(config))
    assert type(module) is getattr(radgrad.nn, kind)
    torch.manual_seed(1)
    samples = torch.stack([_flat(_grads(module, x, states)) for _ in range(400)])
    assert_unbiased(samples, exact)


@KINDS
@pytest.mark.parametrize("bidirectional", [False, True])
def test_training_outputs_are_torchs_and_eval_runs_torch_itself(kind, bidirectional):
    module, x, states = _problem(kind, batch_first=True, bidirectional=bidirectional)
    plain = copy.deepcopy(module)
    params = list(module.parameters())
    radgrad.convert(module, method="quantize")
    assert all(a is b for a, b in zip(module.parameters(), params))
    assert module.state_dict().keys() == plain.state_dict().keys()
    for a, b in zip(_run(module, x, states), _run(plain, x, states)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    module.eval(), plain.eval()
    assert all(torch.equal(a, b) for a, b in zip(_run(module, x, states), _run(plain, x, states)))


@KINDS
def test_batch_first_unbatched_no_bias_no_state_and_dropout(kind):
    torch.manual_seed(0)
    module = getattr(radgrad.nn, kind)(3, 4, num_layers=2, batch_first=True, bias=False, dropout=0.5,
                                       method="quantize")
    out, *last = _run(module, torch.randn(2, 6, 3).transpose(0, 1).contiguous().transpose(0, 1), [])  # strided
    assert out.shape == (2, 6, 4) and all(s.shape == (2, 2, 4) for s in last)
    (out.sum() + sum(s.sum() for s in last)).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in module.parameters())
    out, *last = _run(module, torch.randn(6, 3), [])
    assert out.shape == (6, 4) and all(s.shape == (2, 4) for s in last)
    twin = getattr(nn, kind)(3, 4, num_layers=2, bias=False)
    assert twin.state_dict().keys() == module.state_dict().keys()


@pytest.mark.parametrize("kind,coefficients", [("LSTM", 6), ("GRU", 5)])
def test_saves_compressed_coefficients_and_sketches(kind, coefficients):
    torch.manual_seed(0)
    plain = getattr(nn, kind)(32, 32)
    x = torch.randn(20, 8, 32)
    model = radgrad.convert(copy.deepcopy(plain), method="quantize")
    exact, rad = radgrad.memory.saved_bytes(plain, x), radgrad.memory.measure(model, x)
    # 4-bit coefficients and a 2-bit state per step, example and hidden unit, the 2-bit input,
    # and their scales
    codes = 20 * 8 * 32 * (coefficients * 4 + 2 + 2) // 8
    assert codes <= rad.total < 1.5 * codes and rad.total < 0.15 * exact


def test_convert_skips_projections_and_bad_input_is_a_clear_error():
    plain = nn.LSTM(2, 3, proj_size=2)
    with pytest.warns(UserWarning, match=r"left exact: \(model\) \(LSTM\)"):
        assert type(radgrad.convert(plain)) is nn.LSTM
    assert radgrad.coverage(plain).exact == {"": "LSTM: its settings are not supported by radgrad.nn.LSTM"}
    with pytest.raises(ValueError, match="radgrad.nn.LSTM: proj_size > 0 is not supported"):
        radgrad.nn.LSTM(2, 3, proj_size=2)
    lstm = radgrad.nn.LSTM(2, 3, keep=0.5)
    with pytest.raises(TypeError, match="radgrad.nn.LSTM: PackedSequence inputs are not supported"):
        lstm(nn.utils.rnn.pack_sequence([torch.randn(4, 2), torch.randn(2, 2)]))
    with pytest.raises(ValueError, match=r"v must be \(T, B, 4H\) with T >= 1, got shape \(0, 2, 12\)"):
        lstm(torch.randn(0, 2, 2))
    w = torch.randn(12, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"expected weight \(4H, H\), v \(T, B, 4H\), h0 \(B, H\), c0 \(B, H\); "
                                         r"got weight \(12, 3\), v \(4, 2, 12\), h0 \(2, 3\), c0 \(3, 3\)"):
        radgrad.functional.lstm_recurrence(torch.randn(4, 2, 12), torch.zeros(2, 3), torch.zeros(3, 3), w)
    with pytest.raises(ValueError, match=r"coefficient_bits must be one of"):
        radgrad.functional.lstm_recurrence(torch.randn(4, 2, 12), torch.zeros(2, 3), torch.zeros(2, 3), w,
                                           coefficient_bits=3)


def test_gru_bad_input_is_a_clear_error():
    gru = radgrad.nn.GRU(2, 3, keep=0.5)
    with pytest.raises(TypeError, match="radgrad.nn.GRU: PackedSequence inputs are not supported"):
        gru(nn.utils.rnn.pack_sequence([torch.randn(4, 2), torch.randn(2, 2)]))
    with pytest.raises(ValueError, match=r"v must be \(T, B, 3H\) with T >= 1, got shape \(0, 2, 9\)"):
        gru(torch.randn(0, 2, 2))
    w = torch.randn(9, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"expected weight \(3H, H\), v \(T, B, 3H\), h0 \(B, H\), bias \(3H,\); "
                                         r"got weight \(9, 3\), v \(4, 2, 9\), h0 \(2, 3\), bias \(3,\)"):
        radgrad.functional.gru_recurrence(torch.randn(4, 2, 9), torch.zeros(2, 3), w, torch.zeros(3))


def _recurrence(kind, v, h0, weight):
    config = radgrad.SketchConfig(method="quantize")
    if kind == "LSTM":
        return radgrad.functional.lstm_recurrence(v, h0, h0 * 0.5, weight, config)
    return radgrad.functional.gru_recurrence(v, h0, weight, None, config)


@KINDS
@pytest.mark.parametrize("layout", ["empty-batch", "strided", "expanded-state", "meta"])
def test_recurrence_takes_any_layout(kind, layout):
    gates = 4 if kind == "LSTM" else 3
    device = "meta" if layout == "meta" else "cpu"
    batch = 0 if layout == "empty-batch" else 2
    v = torch.randn(5, batch, 2 * gates * 3, device=device)[..., ::2] if layout == "strided" else \
        torch.randn(5, batch, gates * 3, device=device)
    h0 = torch.randn(1, 3).expand(batch, 3) if layout == "expanded-state" else torch.randn(batch, 3, device=device)
    v, h0 = v.requires_grad_(), h0.requires_grad_()
    weight = torch.randn(gates * 3, 3, device=device, requires_grad=True)

    def run(v, h0):
        torch.manual_seed(1)
        outputs = _recurrence(kind, v, h0, weight)
        return outputs, torch.autograd.grad(sum(o.square().sum() for o in outputs), (v, h0, weight))

    outputs, grads = run(v, h0)
    assert outputs[0].shape == (5, batch, 3) and all(o.shape == (batch, 3) for o in outputs[1:])
    assert [g.shape for g in grads] == [v.shape, h0.shape, weight.shape]
    if device == "cpu":  # the same draws give the same gradients as contiguous inputs
        want_outputs, want = run(v.detach().contiguous().requires_grad_(), h0.detach().contiguous().requires_grad_())
        assert all(torch.equal(a, b) for a, b in zip(outputs, want_outputs))
        assert all(torch.equal(a, b) for a, b in zip(grads, want))
        assert batch or grads[2].abs().sum() == 0  # no examples: no gradient
