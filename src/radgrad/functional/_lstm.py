"""RAD LSTM recurrence: exact states; the backward pass through time from compressed coefficients."""

from __future__ import annotations

import torch
from torch import Tensor

from radgrad.functional._base import _DEFAULT, _EXACT, _RADFunction, _check_config, _packed, _sketch_from
from radgrad.functional._recurrence import _chunks, _previous_states
from radgrad.saved import save_for_backward, saved_tensors
from radgrad.sketch import SketchConfig, _bits

__all__ = ["lstm_recurrence"]


# NOTE [RAD LSTM]
#   With gates z_t = v_t + h_{t-1} W^T split as (i, f, g, o) (torch's order),
#   i, f, o = sigmoid, g = tanh, c_t = f c_{t-1} + i g and h_t = o tanh(c_t),
#   one step of the backward pass, given dh (output gradient plus the carry)
#   and the carried dc, is
#       dc   += dh * A                              A   = o (1 - tanh(c_t)^2)
#       dz_i  = dc * Q_i                            Q_i = g i (1 - i)
#       dz_f  = dc * Q_f                            Q_f = c_{t-1} f (1 - f)
#       dz_g  = dc * Q_g                            Q_g = i (1 - g^2)
#       dz_o  = dh * Q_o                            Q_o = tanh(c_t) o (1 - o)
#       dc_{t-1} = dc * f,   dh_{t-1} = dz W,   dW += dz^T h_{t-1}
#   Every gradient is a sum over paths of products in which each of the six
#   coefficients (A, Q_i, Q_f, Q_g, Q_o, f) of a step appears at most once,
#   so independent unbiased estimates of them, one draw per step, give an
#   unbiased gradient (RAD's framework: independent estimates of the factors
#   of each local Jacobian). They are computed in the forward pass and stored
#   by stochastic rounding to ``coefficient_bits`` bits (4 by default) with a
#   scale per coefficient, step and example (or group of short rows). The
#   carried dc is multiplied by an estimate at every step, so their noise
#   compounds over time: sampling would make long sequences' gradients explode
#   in variance. Measured on a randomly initialised 128-wide LSTM (one draw's
#   error in the gradient of all parameters, relative to the exact gradient,
#   mean of 20; inputs and states stored at 2 bits): over 200 steps 0.301
#   with exact coefficients, 0.302 at 8 bits, 0.307 at 4, 0.407 at 2, 1.01 at
#   1; over 1000 steps 0.145 exact and 0.147 at 4 bits.
#   dW is linear in the previous states, stored as sketches with the layer's
#   config, as the Elman recurrence does (NOTE [RAD recurrence]). Steps are
#   packed and rebuilt in chunks of _CHUNK: a chunk's gates, cells and
#   coefficients are dense while it is packed, and the byte-level LSTM of
#   benchmarks/bench_gated_rnn.py peaked at 73.8 MB with chunks of 64 steps, 53.1
#   with 16, in the same time.
_CHUNK = 16


class _LSTM(_RADFunction):
    _materialize_grads = True  # the states and the last cell state are differentiable

    @staticmethod
    def forward(v, h0, c0, weight, config, coefficients):
        steps, batch, hidden = v.shape[0], v.shape[1], h0.shape[-1]
        output = v.new_empty(steps, batch, hidden)
        c = c0
        tied, parts = output, []
        for lo, hi in _chunks(steps, _CHUNK):
            # the step loop computes the states; the coefficients follow for the whole chunk at once
            gates = v.new_empty(hi - lo, batch, 4, hidden)
            cells = v.new_empty(hi - lo + 1, batch, hidden)  # c_{lo-1} .. c_{hi-1}
            tanh_cells = v.new_empty(hi - lo, batch, hidden)
            cells[0] = c
            for t in range(lo, hi):
                z = torch.addmm(v[t], output[t - 1] if t else h0, weight.t()).view(batch, 4, hidden)
                a = gates[t - lo]
                torch.sigmoid(z, out=a)
                a[:, 2] = z[:, 2].tanh()
                c = cells[t - lo + 1]
                torch.mul(a[:, 1], cells[t - lo], out=c).addcmul_(a[:, 0], a[:, 2])
                torch.mul(a[:, 3], torch.tanh(c, out=tanh_cells[t - lo]), out=output[t])
            i, f, g, o = gates.unbind(2)
            coeff = v.new_empty(hi - lo, batch, 6, hidden)
            # slices written by assignment: torch.compile takes no strided out= tensor
            coeff[:, :, 0] = g * (i * (1 - i))
            coeff[:, :, 1] = cells[:-1] * (f * (1 - f))
            coeff[:, :, 2] = i * (1 - g.square())
            coeff[:, :, 3] = tanh_cells * (o * (1 - o))
            coeff[:, :, 4] = o * (1 - tanh_cells.square())
            coeff[:, :, 5] = f
            c = c.clone()
            tied = _pack_chunk(tied, parts, _previous_states(output, h0, lo, hi), coeff, config, coefficients)
        return tied, output[-1].clone(), c, *parts

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        v, h0, c0, weight, config, coefficients = inputs
        _save_chunks(ctx, v, h0, weight, outputs[0], outputs[3:], config, coefficients, 6)

    @staticmethod
    def backward(ctx, grad_output, grad_h, grad_c, *_):
        weight, *rest = saved_tensors(ctx, unpack=False)
        grad_v = grad_output.new_empty(ctx.shape)
        grad_weight = torch.zeros_like(weight)
        batch, hidden = ctx.shape[1], weight.shape[1]
        carry_h, carry_c = grad_h, grad_c
        for n, (lo, hi) in reversed(list(enumerate(ctx.chunks))):
            previous, coeff = rest[2 * n].unpack(), rest[2 * n + 1].unpack()
            for t in reversed(range(lo, hi)):
                q = coeff[t - lo]
                dh = grad_output[t] + carry_h
                dc = torch.addcmul(carry_c, dh, q[:, 4])
                dz = grad_v[t].view(batch, 4, hidden)
                dz[:, :3] = dc.unsqueeze(1) * q[:, :3]
                dz[:, 3] = dh * q[:, 3]
                carry_c = dc * q[:, 5]
                carry_h = grad_v[t].mm(weight)
            grad_weight.addmm_(grad_v[lo:hi].flatten(0, 1).t(), previous.flatten(0, 1))
        return grad_v, carry_h, carry_c, grad_weight, None, None


def _pack_chunk(tied: Tensor, parts: list[Tensor | None], previous: Tensor, coeff: Tensor, config: SketchConfig,
                coefficients: SketchConfig) -> Tensor:
    """``tied`` tied to the sketches of a chunk of steps: its ``previous`` states and its
    coefficients ``coeff``, whose tensors are appended to ``parts`` (six per chunk)."""
    tied, *packed = _packed(tied, previous, config, 2)
    parts += packed
    tied, *packed = _packed(tied, coeff, coefficients, 3, fresh=True)
    parts += packed
    return tied


def _save_chunks(ctx, v: Tensor, h0: Tensor, weight: Tensor, output: Tensor, parts: tuple, config: SketchConfig,
                 coefficients: SketchConfig, count: int) -> None:
    """Save ``weight`` and, chunk by chunk, the sketches :func:`_pack_chunk` made (``count``
    coefficients per step and unit); ``ctx.chunks`` and ``ctx.shape`` for the backward pass."""
    chunks = _chunks(v.shape[0], _CHUNK)
    ctx.chunks, ctx.shape = chunks, v.shape
    saved = [weight]
    for n, (lo, hi) in enumerate(chunks):
        previous = _previous_states(output, h0, lo, hi)
        saved.append(_sketch_from(ctx, parts[6 * n:6 * n + 3], previous, config, 2))
        shape = torch.Size((hi - lo, v.shape[1], count, h0.shape[-1]))
        saved.append(_sketch_from(ctx, parts[6 * n + 3:6 * n + 6], shape, coefficients, 3, v.dtype))
    save_for_backward(ctx, *saved)


def _check_shapes(name: str, gates: int, v: Tensor, weight: Tensor, states: dict[str, Tensor],
                  biases: dict[str, Tensor | None] | None = None) -> None:
    """Raise a ValueError naming ``name`` unless ``v`` is ``(T, B, gates H)`` with ``T >= 1``, ``weight``
    ``(gates H, H)``, every tensor of ``states`` ``(B, H)`` and every bias that is not None ``(gates H,)``."""
    if v.dim() != 3 or v.shape[0] == 0:
        raise ValueError(f"radgrad.functional.{name}: v must be (T, B, {gates}H) with T >= 1, "
                         f"got shape {tuple(v.shape)}")
    batch, hidden = v.shape[1], weight.shape[-1]
    wanted = {"weight": (weight, f"({gates}H, H)", (gates * hidden, hidden)),
              "v": (v, f"(T, B, {gates}H)", (v.shape[0], batch, gates * hidden)),
              **{k: (t, "(B, H)", (batch, hidden)) for k, t in states.items()},
              **{k: (t, f"({gates}H,)", (gates * hidden,)) for k, t in (biases or {}).items()}}
    if any(t is not None and tuple(t.shape) != shape for t, _, shape in wanted.values()):
        raise ValueError(
            f"radgrad.functional.{name}: expected " + ", ".join(f"{k} {text}" for k, (_, text, _) in wanted.items())
            + "; got " + ", ".join(f"{k} {None if t is None else tuple(t.shape)}" for k, (t, _, _) in wanted.items()))


def _coefficient_config(coefficient_bits: int | None) -> SketchConfig:
    """How a recurrence stores its backward coefficients: stochastic rounding to ``coefficient_bits``, or exactly."""
    bits = _bits("coefficient_bits", coefficient_bits)
    return _EXACT if bits is None else SketchConfig(method="quantize", bits=bits)


def lstm_recurrence(
    v: Tensor, h0: Tensor, c0: Tensor, weight: Tensor, config: SketchConfig = _DEFAULT,
    coefficient_bits: int | None = 4,
) -> tuple[Tensor, Tensor, Tensor]:
    """RAD LSTM recurrence over the first dimension of ``v``, with torch's gate order (i, f, g, o).

    Args:
        v: ``(T, B, 4H)`` input projections, biases included.
        h0, c0: ``(B, H)`` initial hidden and cell states.
        weight: ``(4H, H)`` recurrent weight.
        config: how the previous hidden states are stored for the recurrent weight's gradient.
        coefficient_bits: bits of the stochastic rounding that stores each step's six
            backward coefficients (NOTE [RAD LSTM]); ``None`` stores them exactly.

    Returns:
        ``(output, h_T, c_T)``: all hidden states ``(T, B, H)``, the last hidden and cell states.

    Exact: the three outputs (the arithmetic of torch's LSTM, in another
    order: equal up to rounding). Estimated, unbiased: every gradient, from
    coefficients rounded stochastically at every step (exact with
    ``coefficient_bits=None``), and the recurrent weight's also from
    sketches of the previous states.
    """
    _check_config("functional.lstm_recurrence", config)
    coefficients = _coefficient_config(coefficient_bits)
    _check_shapes("lstm_recurrence", 4, v, weight, {"h0": h0, "c0": c0})
    if not (weight.requires_grad and torch.is_grad_enabled()):
        config = _EXACT  # nothing reads the states but dL/dW: store no sketch
    return tuple(_LSTM.run(v, h0, c0, weight, config, coefficients)[:3])
