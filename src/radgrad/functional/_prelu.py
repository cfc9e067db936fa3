"""RAD PReLU: the input gradient exact from a 1-bit mask, the slope's gradient from a sketch of the
negative part.

NOTE [PReLU from a mask and a sketch]
    ``y = x`` where ``x > 0`` and ``a * x`` elsewhere, with a slope ``a``
    per channel (dimension 1) or one for all. Its backward is
        dx = grad where x > 0, a * grad elsewhere,
        da = sum over all but the channel dimension of grad * min(x, 0).
    ``dx`` needs only where ``x > 0``, one bit per entry, and the slope
    itself: it is exact. ``da`` is linear in ``min(x, 0)``, so an unbiased
    sketch of that makes it an unbiased estimate; its rows are (example,
    channel) pairs, as a convolution's input's are (examples, for an
    ``(N, C)`` input). With a frozen slope only the mask is saved; for an
    input that needs no gradient, only the sketch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from radgrad import bits
from radgrad.functional._base import _DEFAULT, _RADFunction, _check_config, _check_input, _packed, _sketch_from
from radgrad.saved import save_for_backward, saved_tensors
from radgrad.sketch import SketchConfig

__all__ = ["prelu"]


class _PReLU(_RADFunction):
    @staticmethod
    def forward(input, weight, config):
        output = F.prelu(input, weight)
        if config is None:  # a frozen slope: nothing but the mask
            return output, None, None, None
        return _packed(output, input.clamp(max=0), config, _batch_dims(input), fresh=True)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        input, weight, config = inputs
        # torch's backward passes the gradient as it is where input > 0 (NaN: times the slope)
        mask = bits.pack(input > 0) if ctx.needs_input_grad[0] else None
        sketch = None if config is None else _sketch_from(ctx, outputs[1:], input.shape, config, _batch_dims(input),
                                                          input.dtype)
        save_for_backward(ctx, mask, sketch, weight)

    @staticmethod
    def backward(ctx, grad, *_):
        mask, sketch, weight = saved_tensors(ctx, unpack=False)
        grad_input = grad_weight = None
        if mask is not None:
            slope = weight.view(-1, *[1] * (grad.dim() - 2)) if weight.numel() > 1 else weight.view(())
            passed = bits.masked_grad(grad, mask)
            # where the mask is set this adds (grad - grad) * slope = 0; elsewhere 0 + grad * slope
            grad_input = passed.add_((grad - passed).mul_(slope))
        if sketch is not None:
            product = sketch.unpack().mul_(grad)
            dims = [0, *range(2, grad.dim())] if weight.numel() > 1 else list(range(grad.dim()))
            grad_weight = product.sum(dims).reshape(weight.shape).to(weight.dtype)
        return grad_input, grad_weight, None


def _batch_dims(input: Tensor) -> int:
    """Rows of (example, channel) pairs for a map, of examples for an ``(N, C)`` input."""
    return 2 if input.dim() > 2 else 1


def prelu(input: Tensor, weight: Tensor, config: SketchConfig = _DEFAULT) -> Tensor:
    """RAD ``F.prelu``: exact output and input gradient, unbiased slope gradient.

    Saves a 1-bit mask of where ``input > 0`` and, when the slope needs a
    gradient, a sketch of ``min(input, 0)`` with a row per example and
    channel (NOTE [PReLU from a mask and a sketch]). An exact config, an
    input of fewer than two dimensions or no gradient needed runs
    ``F.prelu`` unchanged.
    """
    _check_config("functional.prelu", config)
    _check_input("functional.prelu", input)
    if config.exact or input.dim() < 2 or not torch.is_grad_enabled() \
            or not (input.requires_grad or weight.requires_grad):
        return F.prelu(input, weight)
    return _PReLU.run(input, weight, config if weight.requires_grad else None)[0]
