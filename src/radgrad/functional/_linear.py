"""RAD linear layer: exact output and input gradient, weight gradient from a sketch of the input (or, for
a product's output, from the product's sketches of its factors)."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from radgrad.functional._base import (
    _DEFAULT, _RADFunction, _apply, _autocast_dtype, _blocks, _check_config, _check_input, _packed, _randomized,
    _sketch_from, _torch,
)
from radgrad.functional._matmul import product_sketches
from radgrad.functional._source import record
from radgrad.saved import save_for_backward, saved_tensors
from radgrad.sketch import Sketch, SketchConfig, unpack_rows

__all__ = ["linear"]


class _LinearOfProduct(_RADFunction):
    """:class:`_Linear` whose input is a product whose factors' sketches it reads (NOTE [A product's
    sketches serve the next layer]): it draws and packs nothing."""

    @staticmethod
    def forward(input, weight, bias, factors):
        return F.linear(input, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, weight, _, (a, b) = inputs
        save_for_backward(ctx, a, b, weight if ctx.needs_input_grad[0] else None)

    @staticmethod
    def backward(ctx, grad):
        a, b, weight = saved_tensors(ctx, unpack=False)
        return _grads(ctx, grad, weight, a, lambda lo, hi: unpack_rows(a, lo, hi).mul_(unpack_rows(b, lo, hi)))


class _Linear(_RADFunction):
    @staticmethod
    def forward(input, weight, bias, config):
        return _packed(F.linear(input, weight, bias), input, config, input.dim() - 1)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        input, weight, _, config = inputs
        sketch = _sketch_from(ctx, outputs[1:], input, config, input.dim() - 1)
        save_for_backward(ctx, sketch, weight if ctx.needs_input_grad[0] else None)

    @staticmethod
    def backward(ctx, grad, *_):
        sketch, weight = saved_tensors(ctx, unpack=False)
        return _grads(ctx, grad, weight, sketch, lambda lo, hi: unpack_rows(sketch, lo, hi))


def _grads(ctx, grad: Tensor, weight: Tensor | None, sketch: Sketch, estimate: Callable[[int, int], Tensor]):
    """A linear layer's (input, weight, bias, config) gradients; ``estimate(lo, hi)`` gives rows ``lo .. hi``
    of the input's estimate, rebuilt a block at a time (blocks as for ``sketch``)."""
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad2d = grad.reshape(-1, grad.shape[-1])
    grad_input = grad.matmul(weight) if need_input else None
    grad_weight = None
    if need_weight:
        for lo, hi in _blocks(sketch, grad2d.shape[0], sketch.shape[-1]):
            part = estimate(lo, hi)
            if grad_weight is None:
                grad_weight = grad2d[lo:hi].t().mm(part)
            else:
                grad_weight.addmm_(grad2d[lo:hi].t(), part)
    grad_bias = grad2d.sum(0) if need_bias else None
    return grad_input, grad_weight, grad_bias, None



def _factors(input: Tensor, config: SketchConfig):
    """The sketches of ``input``'s factors when it is a product this layer may read them from."""
    factors = product_sketches(input)
    if factors is None or factors[0].config != config or _autocast_dtype(input.device.type) is not None:
        return None
    return factors


def linear(
    input: Tensor, weight: Tensor, bias: Tensor | None = None, config: SketchConfig = _DEFAULT
) -> Tensor:
    """RAD ``F.linear``: exact output, weight gradient from a sketch of ``input``.

    Each position of every leading dimension of ``input`` is a row of the
    sketch (NOTE [Sketch layout] in :mod:`radgrad.sketch`). An ``input`` that
    :func:`radgrad.functional.mul` returned, quantized with this config, is
    read from the product's own sketches of its factors instead (eagerly:
    NOTE [A product's sketches serve the next layer] in
    :mod:`radgrad.functional._matmul`).
    """
    _check_config("functional.linear", config)
    _check_input("functional.linear", input)
    if not _randomized(config, weight):
        output = _torch(F.linear, input, weight, bias)
    elif (factors := _factors(input, config)) is not None:
        output = _LinearOfProduct.run(input, weight, bias, factors)
    else:
        output = _apply(_Linear.run, input, weight, bias, config)[0]
    record(output, input, weight, bias)  # attention may rebuild its queries and keys from these
    return output

