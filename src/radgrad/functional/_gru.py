"""RAD GRU recurrence: exact states; the backward pass through time from compressed coefficients."""

from __future__ import annotations

import torch
from torch import Tensor

from radgrad.functional._base import _DEFAULT, _EXACT, _RADFunction, _check_config
from radgrad.functional._lstm import _CHUNK, _check_shapes, _coefficient_config, _pack_chunk, _save_chunks
from radgrad.functional._recurrence import _chunks, _previous_states
from radgrad.saved import saved_tensors
from radgrad.sketch import SketchConfig

__all__ = ["gru_recurrence"]


# NOTE [RAD GRU]
#   torch's GRU: with u_t = h_{t-1} W^T + b (the recurrent projection, split
#   as (u_r, u_z, u_n)) and the input projection v_t = (v_r, v_z, v_n),
#   r = sigmoid(v_r + u_r), z = sigmoid(v_z + u_z), n = tanh(v_n + r u_n)
#   and h_t = (1 - z) n + z h_{t-1}. One step of the backward pass, given dh
#   (output gradient plus the carry), is
#       dn = dh * C1            C1 = (1 - z) (1 - n^2)     (n's pre-activation)
#       dz = dh * C2            C2 = (h_{t-1} - n) z (1 - z)
#       dr = dn * C3            C3 = u_n r (1 - r)
#       dv = (dr, dz, dn),  du = (dr, dz, dn * C4),  C4 = r
#       dh_{t-1} = dh * C5 + du W,  C5 = z,  dW += du^T h_{t-1},  db += du
#   As for the LSTM (NOTE [RAD LSTM]), each coefficient of a step appears at
#   most once in every product of the backward pass, so independent
#   stochastic roundings of them (4 bits by default) keep every gradient
#   unbiased; dW reads sketches of the previous states.


class _GRU(_RADFunction):
    _materialize_grads = True  # the states and the last state are differentiable

    @staticmethod
    def forward(v, h0, weight, bias, config, coefficients):
        steps, batch, hidden = v.shape[0], v.shape[1], h0.shape[-1]
        output = v.new_empty(steps, batch, hidden)
        tied, parts = output, []
        for lo, hi in _chunks(steps, _CHUNK):
            gates = v.new_empty(hi - lo, batch, 3, hidden)  # r, z, n
            recurrent_n = v.new_empty(hi - lo, batch, hidden)  # u_n
            for t in range(lo, hi):
                previous = output[t - 1] if t else h0
                u = (torch.mm(previous, weight.t()) if bias is None else torch.addmm(bias, previous, weight.t()))
                u = u.view(batch, 3, hidden)
                a, x = gates[t - lo], v[t].reshape(batch, 3, hidden)
                a[:, :2] = (x[:, :2] + u[:, :2]).sigmoid_()
                recurrent_n[t - lo] = u[:, 2]
                a[:, 2] = torch.addcmul(x[:, 2], a[:, 0], u[:, 2]).tanh_()
                torch.addcmul(a[:, 2], a[:, 1], previous - a[:, 2], out=output[t])
            r, z, n = gates.unbind(2)
            previous = _previous_states(output, h0, lo, hi)
            coeff = v.new_empty(hi - lo, batch, 5, hidden)  # C2, C1 (dz and dn in v's order), C3, C4, C5
            coeff[:, :, 0] = (previous - n) * (z * (1 - z))
            coeff[:, :, 1] = (1 - z) * (1 - n.square())
            coeff[:, :, 2] = recurrent_n * (r * (1 - r))
            coeff[:, :, 3] = r
            coeff[:, :, 4] = z
            tied = _pack_chunk(tied, parts, previous, coeff, config, coefficients)
        return tied, output[-1].clone(), *parts

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        v, h0, weight, bias, config, coefficients = inputs
        ctx.has_bias = bias is not None
        _save_chunks(ctx, v, h0, weight, outputs[0], outputs[2:], config, coefficients, 5)

    @staticmethod
    def backward(ctx, grad_output, grad_h, *_):
        weight, *rest = saved_tensors(ctx, unpack=False)
        grad_v = grad_output.new_empty(ctx.shape)
        grad_weight = torch.zeros_like(weight)
        grad_bias = weight.new_zeros(weight.shape[0]) if ctx.has_bias else None
        batch, hidden = ctx.shape[1], weight.shape[1]
        carry = grad_h
        for n, (lo, hi) in reversed(list(enumerate(ctx.chunks))):
            previous, coeff = rest[2 * n].unpack(), rest[2 * n + 1].unpack()
            grad_u = grad_output.new_empty(hi - lo, *ctx.shape[1:])  # the recurrent projection's, a chunk at a time
            for t in reversed(range(lo, hi)):
                q = coeff[t - lo]
                dh = grad_output[t] + carry
                dv, du = grad_v[t].view(batch, 3, hidden), grad_u[t - lo].view(batch, 3, hidden)
                dv[:, 1:] = dh.unsqueeze(1) * q[:, :2]  # dz, dn
                dv[:, 0] = dv[:, 2] * q[:, 2]  # dr
                du[:, :2] = dv[:, :2]
                du[:, 2] = dv[:, 2] * q[:, 3]
                carry = torch.addmm(dh * q[:, 4], grad_u[t - lo], weight)
            grad_weight.addmm_(grad_u.flatten(0, 1).t(), previous.flatten(0, 1))
            if grad_bias is not None:
                grad_bias += grad_u.sum((0, 1))
        return grad_v, carry, grad_weight, grad_bias, None, None


def gru_recurrence(
    v: Tensor, h0: Tensor, weight: Tensor, bias: Tensor | None = None, config: SketchConfig = _DEFAULT,
    coefficient_bits: int | None = 4,
) -> tuple[Tensor, Tensor]:
    """RAD GRU recurrence over the first dimension of ``v``, with torch's gate order (r, z, n).

    Args:
        v: ``(T, B, 3H)`` input projections, the input bias included.
        h0: ``(B, H)`` initial state.
        weight: ``(3H, H)`` recurrent weight.
        bias: ``(3H,)`` recurrent bias (inside the reset gate's product, as torch has it), or None.
        config: how the previous states are stored for the recurrent weight's gradient.
        coefficient_bits: bits of the stochastic rounding that stores each step's five
            backward coefficients (NOTE [RAD GRU]); ``None`` stores them exactly.

    Returns:
        ``(output, h_T)``: all states ``(T, B, H)`` and the last one.

    Exact: both outputs (the arithmetic of torch's GRU, in another order:
    equal up to rounding). Estimated, unbiased: every gradient, from
    coefficients rounded stochastically at every step (exact with
    ``coefficient_bits=None``), and the recurrent weight's also from
    sketches of the previous states.
    """
    _check_config("functional.gru_recurrence", config)
    coefficients = _coefficient_config(coefficient_bits)
    _check_shapes("gru_recurrence", 3, v, weight, {"h0": h0}, {"bias": bias})
    if not (weight.requires_grad and torch.is_grad_enabled()):
        config = _EXACT  # nothing reads the states but dL/dW: store no sketch
    return tuple(_GRU.run(v, h0, weight, bias, config, coefficients)[:2])
