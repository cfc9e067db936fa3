"""RAD Elman recurrence: exact states and input gradients, recurrent weight gradient from sketches."""

from __future__ import annotations

import torch
from torch import Tensor

from radgrad import bits
from radgrad.functional._base import _DEFAULT, _EXACT, _check_config, _RADFunction, _packed, _sketch_from
from radgrad.saved import save_for_backward, saved_tensors
from radgrad.sketch import SketchConfig

__all__ = ["recurrence"]


# NOTE [RAD recurrence]
#   h_t = act(v_t + h_{t-1} W^T) for t = 0..T-1, with v = x W_ih^T + b_ih + b_hh
#   computed outside (a RAD linear over all steps, so every step and example
#   gets fresh samples there). The backward pass through time needs W and the
#   derivative of act at every step: one bit per entry for ReLU, the output
#   itself for tanh (1 - h^2). dL/dW = sum_t g_t^T h_{t-1} is linear in the
#   previous states, which are stored as sketches, a fresh draw for every
#   step and example. With tanh the outputs are stored anyway, so dL/dW is
#   computed exactly from them and nothing is sketched. Steps are packed and
#   unpacked in chunks so the backward pass never holds a full-length dense
#   copy of the states.
_RECURRENCE_CHUNK = 64


class _Recurrence(_RADFunction):
    _materialize_grads = True  # the outputs and the last state are both differentiable

    @staticmethod
    def forward(v, h0, weight, relu, config):
        output = v.new_empty(v.shape)
        act = torch.relu_ if relu else torch.tanh_
        for t in range(v.shape[0]):
            torch.addmm(v[t], output[t - 1] if t else h0, weight.t(), out=output[t])
            act(output[t])
        tied, parts = output, []
        if relu:  # one sketch per chunk of previous states
            for lo, hi in _chunks(v.shape[0]):
                tied, *packed = _packed(tied, _previous_states(output, h0, lo, hi), config, 2)
                parts += packed
        return tied, output[-1].clone(), *parts

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        v, h0, weight, relu, config = inputs
        output, parts = outputs[0], outputs[2:]
        chunks = _chunks(v.shape[0])
        ctx.relu, ctx.chunks, ctx.shape = relu, chunks, v.shape
        if relu:
            saved = [weight]
            for i, (lo, hi) in enumerate(chunks):
                previous = _previous_states(output, h0, lo, hi)
                saved += [_sketch_from(ctx, parts[3 * i:3 * i + 3], previous, config, 2),
                          bits.pack(output[lo:hi])]
        else:
            saved = [weight, h0, output]
        save_for_backward(ctx, *saved)

    @staticmethod
    def backward(ctx, grad_output, grad_last, *_):
        weight, *rest = saved_tensors(ctx, unpack=False)
        grad_v = torch.empty(ctx.shape, dtype=grad_output.dtype, device=grad_output.device)
        grad_weight = torch.zeros_like(weight)
        if not ctx.relu:
            h0, output = rest
        carry = grad_last
        for i, (lo, hi) in reversed(list(enumerate(ctx.chunks))):
            if ctx.relu:
                previous, passes = rest[2 * i].unpack(), bits.unpack(rest[2 * i + 1])
            else:
                previous = _previous_states(output, h0, lo, hi)
            for t in reversed(range(lo, hi)):
                g = grad_output[t] + carry
                if ctx.relu:
                    g = torch.ops.aten.threshold_backward(g, passes[t - lo], 0)
                else:
                    g.mul_(1 - output[t].square())
                grad_v[t] = g
                carry = g.mm(weight)
            grad_weight.addmm_(grad_v[lo:hi].flatten(0, 1).t(), previous.flatten(0, 1))
        return grad_v, carry, grad_weight, None, None


def _chunks(steps: int, size: int | None = None) -> list[tuple[int, int]]:
    size = _RECURRENCE_CHUNK if size is None else size  # read at the call: tests set it
    return [(lo, min(steps, lo + size)) for lo in range(0, steps, size)]


def _previous_states(output: Tensor, h0: Tensor, lo: int, hi: int) -> Tensor:
    """States h_{lo-1} .. h_{hi-2}, the inputs of the recurrent matmul at steps lo .. hi-1."""
    if lo:
        return output[lo - 1 : hi - 1]
    return torch.cat([h0.unsqueeze(0), output[: hi - 1]])


def recurrence(
    v: Tensor, h0: Tensor, weight: Tensor, nonlinearity: str = "relu", config: SketchConfig = _DEFAULT
) -> tuple[Tensor, Tensor]:
    """RAD Elman recurrence ``h_t = act(v_t + h_{t-1} W^T)`` over the first dimension of ``v``.

    Args:
        v: ``(T, B, H)`` input projections, biases included.
        h0: ``(B, H)`` initial state.
        weight: ``(H, H)`` recurrent weight.
        nonlinearity: ``"relu"`` or ``"tanh"``.

    Returns:
        ``(output, h_T)``: all states ``(T, B, H)`` and the last one.

    Exact: both outputs and the gradients with respect to ``v`` and ``h0``.
    Estimated (ReLU, keep < 1): the gradient of ``weight``, from per-step
    sketches of the states (NOTE [RAD recurrence]).
    """
    _check_config("functional.recurrence", config)
    if nonlinearity not in ("relu", "tanh"):
        raise ValueError(f"radgrad.functional.recurrence: nonlinearity must be 'relu' or 'tanh', got {nonlinearity!r}")
    if v.shape[0] == 0:
        raise ValueError("radgrad.functional.recurrence: expected a sequence of at least one time step, got 0")
    relu = nonlinearity == "relu"
    if not (weight.requires_grad and torch.is_grad_enabled()):
        config = _EXACT  # nothing reads the states but dL/dW: store no sketch
    output, last = _Recurrence.run(v, h0, weight, relu, config)[:2]
    return output, last
