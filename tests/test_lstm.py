import copy

import pytest
import torch
from torch import nn

import radgrad
from problems import assert_unbiased, config_id, options

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _problem(layers=2, batch=3, steps=7, seed=0, **kwargs):
    torch.manual_seed(seed)
    lstm = nn.LSTM(5, 4, num_layers=layers, **kwargs).double()
    shape = (batch, steps, 5) if kwargs.get("batch_first") else (steps, batch, 5)
    x = torch.randn(shape, dtype=torch.float64)
    hx = tuple(0.5 * torch.randn(layers, batch, 4, dtype=torch.float64) for _ in range(2))
    return lstm, x, hx


def _grads(lstm, x, hx):
    """Gradients of a loss that uses every output and both last states: x, h0, c0, then the parameters."""
    x, h0, c0 = (t.clone().requires_grad_() for t in (x, *hx))
    out, (h_n, c_n) = lstm(x, (h0, c0))
    loss = out.square().sum() + h_n.sin().sum() + (c_n * torch.linspace(-1, 1, c_n.shape[-1])).sum()
    return torch.autograd.grad(loss, [x, h0, c0, *lstm.parameters()])


def _flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def test_recurrence_with_exact_coefficients_equals_torch_float64():
    lstm, x, (h0, c0) = _problem(layers=1, steps=35)  # three chunks of steps
    params = [x.requires_grad_(), h0.requires_grad_(), c0.requires_grad_(), *lstm.parameters()]
    out, (h_n, c_n) = lstm(x, (h0, c0))
    expected = torch.autograd.grad(out.square().sum() + h_n.sin().sum() + c_n.cos().sum(), params)
    v = nn.functional.linear(x, lstm.weight_ih_l0, lstm.bias_ih_l0) + lstm.bias_hh_l0
    got_out, got_h, got_c = radgrad.functional.lstm_recurrence(v, h0[0], c0[0], lstm.weight_hh_l0,
                                                               radgrad.SketchConfig(1.0), coefficient_bits=None)
    for a, b in ((got_out, out), (got_h, h_n[0]), (got_c, c_n[0])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)  # torch's arithmetic in another order
    got = torch.autograd.grad(got_out.square().sum() + got_h.sin().sum() + got_c.cos().sum(), params)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("config", [radgrad.SketchConfig(method="quantize"), radgrad.SketchConfig(0.5, "sample")],
                         ids=config_id)
def test_every_gradient_is_unbiased(config):
    # every gradient is estimated: the coefficients of the backward pass through time are
    # rounded at every step, the weights' also read sketches of the inputs and states
    lstm, x, hx = _problem(steps=12)
    exact = _flat(_grads(lstm, x, hx))
    radgrad.convert(lstm, **options(config))
    assert type(lstm) is radgrad.nn.LSTM
    torch.manual_seed(1)
    samples = torch.stack([_flat(_grads(lstm, x, hx)) for _ in range(400)])
    assert_unbiased(samples, exact)


def test_training_outputs_are_torchs_and_eval_runs_torch_itself():
    lstm, x, hx = _problem(batch_first=True)
    plain = copy.deepcopy(lstm)
    params = list(lstm.parameters())
    radgrad.convert(lstm, method="quantize")
    assert all(a is b for a, b in zip(lstm.parameters(), params))
    assert lstm.state_dict().keys() == plain.state_dict().keys()
    out, (h_n, c_n) = lstm(x, hx)
    want, (want_h, want_c) = plain(x, hx)
    for a, b in ((out, want), (h_n, want_h), (c_n, want_c)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    lstm.eval(), plain.eval()
    assert all(torch.equal(a, b) for a, b in zip(lstm(x, hx)[1], plain(x, hx)[1]))


def test_batch_first_unbatched_no_bias_no_state_and_dropout():
    torch.manual_seed(0)
    lstm = radgrad.nn.LSTM(3, 4, num_layers=2, batch_first=True, bias=False, dropout=0.5, method="quantize")
    out, (h_n, c_n) = lstm(torch.randn(2, 6, 3).transpose(0, 1).contiguous().transpose(0, 1))  # strided
    assert out.shape == (2, 6, 4) and h_n.shape == c_n.shape == (2, 2, 4)
    (out.sum() + h_n.sum() + c_n.sum()).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in lstm.parameters())
    out, (h_n, c_n) = lstm(torch.randn(6, 3))
    assert out.shape == (6, 4) and h_n.shape == c_n.shape == (2, 4)
    assert nn.LSTM(3, 4, num_layers=2, bias=False).state_dict().keys() == lstm.state_dict().keys()


def test_saves_compressed_coefficients_and_sketches():
    torch.manual_seed(0)
    plain = nn.LSTM(32, 32)
    x = torch.randn(20, 8, 32)
    model = radgrad.convert(copy.deepcopy(plain), method="quantize")
    exact, rad = radgrad.memory.saved_bytes(plain, x), radgrad.memory.measure(model, x)
    # six 4-bit coefficients and a 2-bit state per step, example and hidden unit, the 2-bit
    # input, and their scales
    codes = 20 * 8 * 32 * (6 * 4 + 2 + 2) // 8
    assert codes <= rad.total < 1.5 * codes and rad.total < 0.1 * exact


def test_convert_skips_bidirectional_and_projections_and_bad_input_is_a_clear_error():
    for plain in (nn.LSTM(2, 3, bidirectional=True), nn.LSTM(2, 3, proj_size=2)):
        with pytest.warns(UserWarning, match=r"left exact: \(model\) \(LSTM\)"):
            assert type(radgrad.convert(plain)) is nn.LSTM
        assert radgrad.coverage(plain).exact == {"": "LSTM: its settings are not supported by radgrad.nn.LSTM"}
    with pytest.raises(ValueError, match="bidirectional=True and proj_size > 0 are not supported"):
        radgrad.nn.LSTM(2, 3, proj_size=2)
    lstm = radgrad.nn.LSTM(2, 3, keep=0.5)
    with pytest.raises(TypeError, match="radgrad.nn.LSTM: PackedSequence inputs are not supported"):
        lstm(nn.utils.rnn.pack_sequence([torch.randn(4, 2), torch.randn(2, 2)]))
    with pytest.raises(ValueError, match=r"v must be \(T, B, 4H\) with T >= 1, got shape \(0, 2, 12\)"):
        lstm(torch.randn(0, 2, 2))
    w = torch.randn(12, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"expected weight \(4H, H\), v \(T, B, 4H\), h0 and c0 \(B, H\)"):
        radgrad.functional.lstm_recurrence(torch.randn(4, 2, 12), torch.zeros(2, 3), torch.zeros(3, 3), w)
    with pytest.raises(ValueError, match=r"coefficient_bits must be one of"):
        radgrad.functional.lstm_recurrence(torch.randn(4, 2, 12), torch.zeros(2, 3), torch.zeros(2, 3), w,
                                           coefficient_bits=3)
