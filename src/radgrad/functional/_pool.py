"""Exact ReLU and pooling that save bit masks, shapes or small offsets instead of their input."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from radgrad import bits
from radgrad.functional._base import _RADFunction, _tuple
from radgrad.saved import save_for_backward, saved_tensors

__all__ = ["relu", "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d"]


class _ReLU(_RADFunction):
    @staticmethod
    def forward(input):
        return torch.relu(input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        # torch's ReLU backward passes the gradient where output > 0 or NaN,
        # that is where the output is nonzero: one bit per entry.
        save_for_backward(ctx, bits.pack(output))

    @staticmethod
    def backward(ctx, grad):
        (mask,) = saved_tensors(ctx, unpack=False)
        return bits.masked_grad(grad, mask)


def relu(input: Tensor) -> Tensor:
    """Exact ReLU that saves a 1-bit mask instead of its output."""
    if not (input.requires_grad and torch.is_grad_enabled()):
        return torch.relu(input)
    return _ReLU.run(input)


class _AvgPool(_RADFunction):
    """Average pooling over the last two or three dimensions (``len(options[0])``)."""

    @staticmethod
    def forward(input, options):
        return (F.avg_pool2d if len(options[0]) == 2 else F.avg_pool3d)(input, *options)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, ctx.options = inputs
        ctx.shape = input.shape

    @staticmethod
    def backward(ctx, grad):
        # the backward reads only the input's shape: pass a stride-0 placeholder.
        placeholder = grad.new_zeros(()).expand(ctx.shape)
        backward = torch.ops.aten.avg_pool2d_backward if len(ctx.options[0]) == 2 else torch.ops.aten.avg_pool3d_backward
        return backward(grad, placeholder, *ctx.options), None


def _avg_pool(dims: int, input: Tensor, kernel_size, stride, padding, ceil_mode, count_include_pad,
              divisor_override) -> Tensor:
    options = (_tuple(kernel_size, dims), _tuple(kernel_size if stride is None else stride, dims),
               _tuple(padding, dims), ceil_mode, count_include_pad, divisor_override)
    if not (input.requires_grad and torch.is_grad_enabled()):
        return (F.avg_pool2d if dims == 2 else F.avg_pool3d)(input, *options)
    return _AvgPool.run(input, options)


def avg_pool2d(
    input: Tensor,
    kernel_size: Sequence[int] | int,
    stride: Sequence[int] | int | None = None,
    padding: Sequence[int] | int = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> Tensor:
    """Exact ``F.avg_pool2d`` that saves nothing but the input's shape."""
    return _avg_pool(2, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def avg_pool3d(
    input: Tensor,
    kernel_size: Sequence[int] | int,
    stride: Sequence[int] | int | None = None,
    padding: Sequence[int] | int = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> Tensor:
    """Exact ``F.avg_pool3d`` that saves nothing but the input's shape."""
    return _avg_pool(3, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def avg_pool1d(
    input: Tensor,
    kernel_size: Sequence[int] | int,
    stride: Sequence[int] | int | None = None,
    padding: Sequence[int] | int = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
) -> Tensor:
    """Exact ``F.avg_pool1d`` that saves nothing but the input's shape."""
    stride = kernel_size if stride is None else stride
    out = avg_pool2d(input.unsqueeze(-2), [1, *_tuple(kernel_size, 1)], [1, *_tuple(stride, 1)],
                     [0, *_tuple(padding, 1)], ceil_mode, count_include_pad)
    return out.squeeze(-2)


class _MaxPool(_RADFunction):
    """Max pooling over the last two or three dimensions (``len(kernel)``)."""

    @staticmethod
    def forward(input, kernel, stride, padding, dilation, ceil_mode):
        pool = torch.ops.aten.max_pool2d_with_indices if len(kernel) == 2 else torch.ops.aten.max_pool3d_with_indices
        return pool(input, kernel, stride, padding, dilation, ceil_mode)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        input, kernel, stride, padding, dilation, _ = inputs
        ctx.shape, ctx.options = input.shape, (kernel, stride, padding, dilation)
        ctx.mark_non_differentiable(outputs[1])
        ctx.save_for_backward(_window_offsets(outputs[1], input.shape, ctx.options))

    @staticmethod
    def backward(ctx, grad, _):
        (offsets,) = ctx.saved_tensors
        index = _plane_index(offsets, ctx.shape, ctx.options)
        dims = len(ctx.options[0])
        planes, positions = math.prod(grad.shape[:-dims]), math.prod(grad.shape[-dims:])
        grad_input = grad.new_zeros(planes, math.prod(ctx.shape[-dims:]))
        grad_input.scatter_add_(1, index.reshape(planes, positions), grad.reshape(planes, positions))
        return grad_input.view(ctx.shape), None, None, None, None, None


# NOTE [Compact max-pool indices]
#   torch saves int64 indices into the input plane (plus the whole input).
#   The backward pass needs only which element of its window each output took:
#   an offset below the window's size, one byte for windows up to 256
#   entries. The plane index is rebuilt from the output position.
#   Both conversions divide by small integers in floating point, not int64: a
#   CPU has no vectorized integer division (the stem pool of a ResNet at 32 px,
#   65,536 outputs: 0.8 and 0.65 ms in int64, 0.2 ms each in float32;
#   compiled 0.6 and 0.5 ms against 0.03 each). ``floor((i + 0.5) * (1 / w))`` is
#   ``i // w`` exactly while the product's relative error (two roundings) stays
#   below the distance ``0.5 / (i + 0.5)`` from the quotient to an integer: for
#   ``i < 2**21`` in float32, ``i < 2**50`` in float64. Planes and windows below
#   2**21 entries (every index and offset is below one of the two, and so is every
#   quotient on the way from an index to its coordinates) use float32: half the
#   bytes, and the type every device has.
def _window_origin(shape_out: torch.Size, options, device) -> list[Tensor]:
    """The first input position of each output's window, one column per pooled dimension, each shaped
    to broadcast over the output's positions."""
    _, stride, padding, _ = options
    dims = len(stride)
    origins = [torch.arange(shape_out[i - dims], device=device).mul_(stride[i]).sub_(padding[i])
               for i in range(dims)]
    return [o.view([-1] + [1] * (dims - 1 - i)) if i < dims - 1 else o for i, o in enumerate(origins)]


def _index_dtype(plane: torch.Size, kernel: Sequence[int]) -> torch.dtype:
    """The float type that divides plane indices and window offsets exactly (NOTE [Compact max-pool indices])."""
    return torch.float32 if max(math.prod(plane[-len(kernel):]), math.prod(kernel)) < 2**21 else torch.float64


def _divmod(t: Tensor, divisor: int) -> tuple[Tensor, Tensor]:
    """``(t // divisor, t % divisor)`` for a float tensor of plane indices, the remainder formed in
    ``t`` itself (NOTE [Compact max-pool indices])."""
    quotient = (t + 0.5).mul_(1 / divisor).floor_()
    return quotient, t.sub_(quotient * divisor)


def _coordinates(flat: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    """The coordinates, one tensor per dimension, of row-major ``flat`` indices into an array of ``sizes``."""
    coordinates = []
    for size in reversed(sizes[1:]):
        flat, coordinate = _divmod(flat, size)
        coordinates.append(coordinate)
    return [flat, *reversed(coordinates)]


def _window_offsets(index: Tensor, plane: torch.Size, options) -> Tensor:
    kernel, _, _, dilation = options
    origins = _window_origin(index.shape, options, index.device)
    coordinates = _coordinates(index.to(_index_dtype(plane, kernel)), plane[-len(kernel):])
    offset = None
    for coordinate, origin, size, step in zip(coordinates, origins, kernel, dilation):
        # a window's entries are dilation apart: exact quotients
        d = coordinate.sub_(origin).div_(step)
        offset = d if offset is None else offset.mul_(size).add_(d)
    size = math.prod(kernel)
    dtype = torch.uint8 if size <= 256 else torch.int16 if size <= 2**15 else torch.int32
    # through int32: converting a float to uint8 directly is several times slower on a CPU
    return offset.to(torch.int32).to(dtype)


def _plane_index(offsets: Tensor, plane: torch.Size, options) -> Tensor:
    kernel, _, _, dilation = options
    origins = _window_origin(offsets.shape, options, offsets.device)
    index = None
    for d, origin, size, step in zip(_coordinates(offsets.to(_index_dtype(plane, kernel)), kernel), origins,
                                     plane[-len(kernel):], dilation):
        coordinate = d.mul_(step).add_(origin)
        index = coordinate if index is None else index.mul_(size).add_(coordinate)
    return index.to(torch.int64)


def _max_pool(dims: int, input: Tensor, kernel_size, stride, padding, dilation, ceil_mode) -> Tensor:
    options = (_tuple(kernel_size, dims), _tuple(kernel_size if stride is None else stride, dims),
               _tuple(padding, dims), _tuple(dilation, dims), ceil_mode)
    if not (input.requires_grad and torch.is_grad_enabled()):
        return (F.max_pool2d if dims == 2 else F.max_pool3d)(input, *options)
    return _MaxPool.run(input, *options)[0]


def max_pool2d(
    input: Tensor,
    kernel_size: Sequence[int] | int,
    stride: Sequence[int] | int | None = None,
    padding: Sequence[int] | int = 0,
    dilation: Sequence[int] | int = 1,
    ceil_mode: bool = False,
) -> Tensor:
    """Exact ``F.max_pool2d`` that saves one small offset per output, not the input."""
    return _max_pool(2, input, kernel_size, stride, padding, dilation, ceil_mode)


def max_pool3d(
    input: Tensor,
    kernel_size: Sequence[int] | int,
    stride: Sequence[int] | int | None = None,
    padding: Sequence[int] | int = 0,
    dilation: Sequence[int] | int = 1,
    ceil_mode: bool = False,
) -> Tensor:
    """Exact ``F.max_pool3d`` that saves one small offset per output, not the input."""
    return _max_pool(3, input, kernel_size, stride, padding, dilation, ceil_mode)


def max_pool1d(
    input: Tensor,
    kernel_size: Sequence[int] | int,
    stride: Sequence[int] | int | None = None,
    padding: Sequence[int] | int = 0,
    dilation: Sequence[int] | int = 1,
    ceil_mode: bool = False,
) -> Tensor:
    """Exact ``F.max_pool1d`` that saves one small offset per output, not the input: :func:`max_pool2d`
    over windows one row high."""
    stride = kernel_size if stride is None else stride
    out = max_pool2d(input.unsqueeze(-2), [1, *_tuple(kernel_size, 1)], [1, *_tuple(stride, 1)],
                     [0, *_tuple(padding, 1)], [1, *_tuple(dilation, 1)], ceil_mode)
    return out.squeeze(-2)
