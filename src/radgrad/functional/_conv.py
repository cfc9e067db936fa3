"""RAD convolution and transposed convolution: exact output and input gradient, weight gradient from a sketch
of the input's positions."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from radgrad.functional._base import (
    _DEFAULT, _RADFunction, _apply, _blocks, _check_config, _check_input, _packed, _randomized, _sketch_from, _torch,
    _tuple,
)
from radgrad.saved import save_for_backward, saved_tensors
from radgrad.sketch import SketchConfig, unpack_rows

__all__ = ["conv", "conv_transpose"]


class _Conv(_RADFunction):
    @staticmethod
    def forward(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, config):
        output = torch.convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding,
                                   groups)
        return _packed(output, input, config, 2)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        input, weight, _, *options, config = inputs
        ctx.options = options
        save_for_backward(ctx, _sketch_from(ctx, outputs[1:], input, config, 2), weight)

    @staticmethod
    def backward(ctx, grad, *_):
        sketch, weight = saved_tensors(ctx, unpack=False)
        options = ctx.options  # stride, padding, dilation, transposed, output_padding, groups
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        transposed, groups = options[3], options[5]
        bias_sizes = ([weight.shape[1] * groups] if transposed else [weight.shape[0]]) if need_bias else None
        shape = sketch.shape
        blocks = _blocks(sketch, shape[0] * shape[1], math.prod(shape[2:]), unit=shape[1])
        if len(blocks) == 1:
            grads = torch.ops.aten.convolution_backward(
                grad, sketch.unpack(), weight, bias_sizes, *options, [need_input, need_weight, need_bias])
            return (*grads, *[None] * (len(options) + 1))
        # NOTE [Unpacking in blocks], by examples. Each block's call also gives the input
        # gradient of its examples: one call for both is much faster than two (oneDNN).
        grad_input = grad_weight = grad_bias = None
        # Traced, the input gradient's blocks are joined by a cat. Asking a gradient for its
        # layout while dynamo traces a backward makes it retry with every incoming gradient
        # made contiguous, which fails on the None gradients of the sketch's outputs (torch
        # 2.13): the graph broke at every blocked convolution. Eagerly the blocks are copied
        # into one tensor laid out as the first block, never holding the blocks and the whole.
        compiling = torch.compiler.is_compiling()
        input_blocks = []
        for lo, hi in blocks:
            first, last = lo // shape[1], hi // shape[1]
            part = unpack_rows(sketch, lo, hi).view(last - first, *shape[1:])
            g_input, g_weight, g_bias = torch.ops.aten.convolution_backward(
                grad[first:last], part, weight, bias_sizes, *options, [need_input, need_weight, need_bias])
            if need_input and compiling:
                input_blocks.append(g_input)
            elif need_input:
                if grad_input is None:
                    grad_input = torch.empty(shape, dtype=g_input.dtype, device=g_input.device,
                                             memory_format=_layout(g_input))
                grad_input[first:last] = g_input
            if need_weight:
                grad_weight = g_weight if grad_weight is None else grad_weight.add_(g_weight)
            if need_bias:
                grad_bias = g_bias if grad_bias is None else grad_bias.add_(g_bias)
        if input_blocks:
            grad_input = torch.cat(input_blocks)
        return (grad_input, grad_weight, grad_bias, *[None] * (len(options) + 1))


def _layout(t: Tensor) -> torch.memory_format:
    """The memory format ``t`` is laid out in (channels last, or contiguous)."""
    last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    if last is not None and not t.is_contiguous() and t.is_contiguous(memory_format=last):
        return last
    return torch.contiguous_format


def conv(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: Sequence[int] | int = 1,
    padding: Sequence[int] | int | str = 0,
    dilation: Sequence[int] | int = 1,
    groups: int = 1,
    config: SketchConfig = _DEFAULT,
) -> Tensor:
    """RAD ``F.conv1d`` / ``F.conv2d`` / ``F.conv3d``, chosen by ``weight.dim()``.

    The sketch samples spatial positions of ``input``: every (example,
    channel) pair is a row. ``padding`` takes ints or ``"same"`` / ``"valid"``
    as in torch; uneven ``"same"`` padding is applied with ``F.pad`` first, as
    torch does.
    """
    _check_config("functional.conv", config)
    _check_input("functional.conv", input)
    n = weight.dim() - 2
    if not _randomized(config, weight):
        return _torch(_TORCH_CONV[n], input, weight, bias, stride, padding, dilation, groups)
    unbatched = input.dim() == n + 1
    if unbatched:
        input = input.unsqueeze(0)
    stride, dilation = _tuple(stride, n), _tuple(dilation, n)
    input, padding = _explicit_padding(input, padding, weight, stride, dilation)
    out = _apply(_Conv.run, input, weight, bias, stride, padding, dilation, False, [0] * n, groups, config)[0]
    return out.squeeze(0) if unbatched else out


_TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_transpose(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: Sequence[int] | int = 1,
    padding: Sequence[int] | int = 0,
    output_padding: Sequence[int] | int = 0,
    groups: int = 1,
    dilation: Sequence[int] | int = 1,
    config: SketchConfig = _DEFAULT,
) -> Tensor:
    """RAD ``F.conv_transpose1d`` / ``2d`` / ``3d``, chosen by ``weight.dim()`` (arguments in their order).

    As :func:`conv`: the sketch samples spatial positions of ``input``, every
    (example, channel) pair a row; the output, input and bias gradients are
    exact and the weight gradient an unbiased estimate.
    """
    _check_config("functional.conv_transpose", config)
    _check_input("functional.conv_transpose", input)
    n = weight.dim() - 2
    if not _randomized(config, weight):
        return _torch(_TORCH_CONV_TRANSPOSE[n], input, weight, bias, stride, padding, output_padding, groups,
                      dilation)
    unbatched = input.dim() == n + 1
    if unbatched:
        input = input.unsqueeze(0)
    options = [_tuple(option, n) for option in (stride, padding, dilation)]
    out = _apply(_Conv.run, input, weight, bias, *options, True, _tuple(output_padding, n), groups, config)[0]
    return out.squeeze(0) if unbatched else out


_TORCH_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}



def _explicit_padding(
    input: Tensor, padding: Sequence[int] | int | str, weight: Tensor, stride: list[int], dilation: list[int]
) -> tuple[Tensor, list[int]]:
    n = weight.dim() - 2
    if padding == "valid":
        return input, [0] * n
    if padding != "same":
        return input, _tuple(padding, n)
    if any(s != 1 for s in stride):
        raise ValueError("radgrad.functional.conv: padding='same' is not supported for strided convolutions")
    total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    left = [t // 2 for t in total]
    extra = [t - l for t, l in zip(total, left)]
    if any(extra[i] != left[i] for i in range(n)):
        # torch pads the uneven remainder on the high side of each dimension.
        pad = []
        for i in reversed(range(n)):
            pad += [0, extra[i] - left[i]]
        input = F.pad(input, pad)
    return input, left

