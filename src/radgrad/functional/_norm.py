"""RAD layer normalization: two independent sketches of the normalized input.

NOTE [Layer norm from two sketches]
    With ``xh = (x - mean) * rstd`` over the normalized dimensions (``N``
    entries) and ``gw = grad * weight``, torch's backward is
        dx = rstd * (gw - mean(gw) - xh * mean(gw * xh)),
        dweight = sum over rows of grad * xh,      dbias = sum of grad.
    ``dx`` is quadratic in ``xh``: one sketch used twice would be biased by
    its own variance. Two independent sketches A and B, ``xh * mean(gw * xh)``
    read as ``A * mean(gw * B)``, make every term unbiased. ``rstd`` (one value
    per row) is kept exact, so the output and ``dbias`` are exact and
    ``dx``, ``dweight`` unbiased estimates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from radgrad.functional._base import _DEFAULT, _RADFunction, _check_input, _packed, _sketch_from
from radgrad.saved import save_for_backward, saved_tensors
from radgrad.sketch import SketchConfig

__all__ = ["layer_norm"]


class _LayerNorm(_RADFunction):
    @staticmethod
    def forward(input, shape, weight, bias, eps, config):
        output, mean, rstd = torch.native_layer_norm(input, shape, weight, bias, eps)
        normalized = (input.to(rstd.dtype) - mean).mul_(rstd)
        batch_dims = input.dim() - len(shape)
        output, *a = _packed(output, normalized, config, batch_dims, fresh=True)
        output, *b = _packed(output, normalized, config, batch_dims, fresh=True)
        return output, rstd, *a, *b

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        input, shape, weight, _, _, config = inputs
        output, rstd = outputs[:2]
        ctx.mark_non_differentiable(rstd)
        batch_dims = input.dim() - len(shape)
        a = _sketch_from(ctx, outputs[2:5], input.shape, config, batch_dims, rstd.dtype)
        b = _sketch_from(ctx, outputs[5:8], input.shape, config, batch_dims, rstd.dtype)
        ctx.dims = tuple(range(batch_dims, input.dim()))
        save_for_backward(ctx, a, b, rstd, weight)

    @staticmethod
    def backward(ctx, grad, *_):
        a, b, rstd, weight = saved_tensors(ctx)
        need_input, need_weight, need_bias = ctx.needs_input_grad[0], *ctx.needs_input_grad[2:4]
        g = grad.to(rstd.dtype)
        batch = tuple(range(grad.dim() - len(ctx.dims)))
        grad_input = grad_weight = grad_bias = None
        if need_input:
            gw = g if weight is None else g * weight
            mean_gw = gw.mean(ctx.dims, keepdim=True)
            mean_gwb = (gw * b).mean(ctx.dims, keepdim=True)
            grad_input = (gw - mean_gw - a * mean_gwb).mul_(rstd).to(grad.dtype)
        if need_weight:
            grad_weight = (g * a).sum(batch).to(weight.dtype)
        if need_bias:
            grad_bias = grad.sum(batch)
        return grad_input, None, grad_weight, grad_bias, None, None


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    config: SketchConfig = _DEFAULT,
) -> Tensor:
    """RAD ``F.layer_norm``: exact output and bias gradient, unbiased input and weight gradients.

    Saves two independent sketches of the normalized input and the inverse
    standard deviation of each row (NOTE [Layer norm from two sketches]);
    each normalized group is a row.
    """
    _check_input("functional.layer_norm", input)
    shape = list(normalized_shape) if not isinstance(normalized_shape, int) else [normalized_shape]
    needs = input.requires_grad or any(t is not None and t.requires_grad for t in (weight, bias))
    if config.exact or not (needs and torch.is_grad_enabled()) or math.prod(shape) == 0:
        return F.layer_norm(input, shape, weight, bias, eps)
    return _LayerNorm.run(input, shape, weight, bias, eps, config)[0]
