"""RAD layer, RMS and batch normalization: two independent sketches of the normalized input.

NOTE [Layer norm from two sketches]
    With ``xh = (x - mean) * rstd`` over the normalized dimensions (``N``
    entries: a row's features for layer norm, a channel's batch and spatial
    positions for batch norm) and ``gw = grad * weight``, torch's backward is
        dx = rstd * (gw - mean(gw) - xh * mean(gw * xh)),
        dweight = sum over rows of grad * xh,      dbias = sum of grad.
    ``dx`` is quadratic in ``xh``: one sketch used twice would be biased by
    its own variance. Two independent sketches A and B, ``xh * mean(gw * xh)``
    read as ``A * mean(gw * B)``, make every term unbiased. ``rstd`` (one value
    per row) is kept exact, so the output and ``dbias`` are exact and
    ``dx``, ``dweight`` unbiased estimates. The two come from
    :func:`radgrad.sketch.pack_copies`: quantized, they share one range and
    scale and draw their roundings in one call, independently.

    RMS normalization divides by the root mean square without centring,
    ``xh = x * rstd``; its backward is the same without the ``mean(gw)``
    term, ``dx = rstd * (gw - xh * mean(gw * xh))``, read from the two
    sketches alike.

    Group normalization is layer norm over each example's group of channels
    (all their positions) with a weight per channel; instance normalization
    is group normalization with a group per channel. Their sketches have a
    row per example and channel, as a convolution's and batch norm's do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from radgrad.estimators.quantize import compute_dtype
from radgrad.functional._base import (
    _DEFAULT, _RADFunction, _autocast_dtype, _check_config, _check_input, _packed, _sketch_from, _torch,
)
from radgrad.saved import save_for_backward, saved_tensors
from radgrad.sketch import Sketch, SketchConfig, plane_shape

__all__ = ["layer_norm", "rms_norm", "batch_norm", "group_norm", "instance_norm"]


def _save_row_norm(ctx, input: Tensor, shape: Sequence[int], weight: Tensor | None, config: SketchConfig,
                   outputs: Sequence[Tensor], centered: bool) -> None:
    """Save what a norm over the last ``len(shape)`` dimensions returned: ``(output, rstd, *two sketches)``."""
    ctx.centered = centered
    rstd = outputs[1]
    ctx.mark_non_differentiable(rstd)
    batch_dims = input.dim() - len(shape)
    a = _sketch_from(ctx, outputs[2:5], input.shape, config, batch_dims, rstd.dtype)
    b = _sketch_from(ctx, outputs[5:8], input.shape, config, batch_dims, rstd.dtype)
    ctx.dims = tuple(range(batch_dims, input.dim()))
    ctx.contiguous = input.is_contiguous()
    save_for_backward(ctx, a, b, rstd, weight)


class _LayerNorm(_RADFunction):
    @staticmethod
    def forward(input, shape, weight, bias, eps, config):
        output, mean, rstd = torch.native_layer_norm(input, shape, weight, bias, eps)
        normalized = (input.to(rstd.dtype) - mean).mul_(rstd)
        batch_dims = input.dim() - len(shape)
        output, *sketches = _packed(output, normalized, config, batch_dims, fresh=True, copies=2)
        return output, rstd, *sketches

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        input, shape, weight, *_, config = inputs
        _save_row_norm(ctx, input, shape, weight, config, outputs, centered=True)

    @staticmethod
    def backward(ctx, grad, *_):
        a, b, rstd, weight = saved_tensors(ctx, unpack=False)
        needs = ctx.needs_input_grad[0], *ctx.needs_input_grad[2:4]
        batch = tuple(range(grad.dim() - len(ctx.dims)))
        grad_input, grad_weight, grad_bias = _backward(grad, a, b, rstd, weight, ctx.dims, batch, needs,
                                                       ctx.contiguous, ctx.centered)
        return grad_input, None, grad_weight, grad_bias, None, None


def _backward(grad: Tensor, a: Sketch, b: Sketch, rstd: Tensor, weight: Tensor | None, dims, param_dims, needs,
              contiguous: bool, centered: bool = True):
    """(input, weight, bias) gradients of a normalization from sketches ``a``, ``b`` of its normalized input.

    ``centered``: whether the normalization subtracts the mean (layer and
    batch norm) or not (RMS norm; NOTE [Layer norm from two sketches]).

    ``dims``: the dimensions each mean and rstd runs over; ``param_dims``:
    the dimensions the weight and bias gradients sum over (NOTE [Layer norm
    from two sketches]). ``rstd`` and ``weight`` broadcast against ``grad``.
    ``contiguous``: whether the input was; only then is the gradient read by
    plane (NOTE [Reading codes by plane]), since viewing a strided gradient so
    would copy it. The input decides because its gradient usually shares its
    layout, and torch.compile cannot read the gradient's layout while it
    traces this function ahead of the backward pass.
    """
    shape = grad.shape
    param_shape = [s for i, s in enumerate(shape) if i not in param_dims]
    planes = _planes(a, grad.dim(), dims, param_dims) if contiguous else None
    view = _same
    if planes is not None:
        view, dims, param_dims = planes
        grad, rstd, weight = view(grad), view(rstd), None if weight is None else view(weight)
    need_input, need_weight, need_bias = needs
    g = grad.to(rstd.dtype)
    grad_input = grad_weight = grad_bias = None
    # The estimates are rebuilt one at a time, fresh tensors of ours, and every input-sized tensor
    # that is ours is updated in place: at most three live at once beside the incoming gradient,
    # which on a convnet's first layer is the step's peak.
    if need_input:
        gw = g if weight is None else g * weight
        mean_gw = gw.mean(dims, keepdim=True) if centered else None
        mean_gwb = view(b.unpack()).mul_(gw).mean(dims, keepdim=True)
        grad_input = gw if mean_gw is None else gw - mean_gw if gw is g else gw.sub_(mean_gw)
    a = view(a.unpack()) if need_input or need_weight else None
    if need_input:
        # g may be the incoming gradient itself (RMS norm without a weight): never overwritten
        # (addcmul_ also runs several times faster here than subtracting a product)
        grad_input = grad_input - a * mean_gwb if grad_input is g else grad_input.addcmul_(a, mean_gwb, value=-1)
        grad_input = grad_input.mul_(rstd).to(grad.dtype).reshape(shape)
    if need_weight:
        grad_weight = _sum(a.mul_(g), param_dims).to(weight.dtype).reshape(param_shape)
    if need_bias:
        grad_bias = _sum(grad, param_dims).reshape(param_shape)
    return grad_input, grad_weight, grad_bias


# NOTE [Reading codes by plane]
#   Under torch.compile, inductor fuses the dequantization of a sketch into the
#   reductions of the backward pass above. A batch norm's row spans the
#   spatial dimensions: its loops run over (h, w), and the entry at position
#   p = h * W + w sits in byte p mod w' at shift bits * (p div w') for planes
#   w' codes wide (NOTE [Code packing]), index arithmetic that inductor's CPU
#   code generator (torch 2.13) leaves scalar. Viewed as (*batch, planes, w'),
#   every tensor of the backward reads byte j of a plane at index j. Rows of
#   one dimension (a layer norm over features) are indexed by p itself, which
#   inductor vectorizes; viewed by plane they ran some 3-10% slower, so they
#   are not. Nor are planes narrower than 32 codes (no gain measured at 16).
#   benchmarks/bench_norm_backward.py times both ways. Eagerly the views
#   change nothing but the shapes the same kernels see.
_MIN_PLANE_WIDTH = 32


def _planes(sketch: Sketch, ndim: int, dims, param_dims):
    """``(view, dims, param_dims)`` to run the backward with every row split into its code planes
    (NOTE [Reading codes by plane]), or None: a row of one dimension, or codes that do not fill
    planes wide enough.

    ``view`` takes a tensor that broadcasts against the input, constant along rows or not; each
    of ``dims`` and ``param_dims`` holds all the row dimensions or none (true of both callers).
    """
    batch = sketch.batch_dims
    planes = plane_shape(sketch)
    if planes is None or planes[-1] < _MIN_PLANE_WIDTH or ndim - batch < 2:
        return None

    def view(t: Tensor) -> Tensor:
        t = t.view([1] * (ndim - t.dim()) + list(t.shape))
        constant = all(size == 1 for size in t.shape[batch:])
        return t.reshape(list(t.shape[:batch]) + ([1, 1] if constant else planes[batch:]))

    def mapped(d) -> tuple[int, ...]:
        return tuple(i for i in d if i < batch) + ((batch, batch + 1) if max(d, default=-1) >= batch else ())

    return view, mapped(dims), mapped(param_dims)


def _same(t: Tensor) -> Tensor:
    return t


def _needs_grad(*tensors: Tensor | None) -> bool:
    """Whether gradients are on and any of ``tensors`` (None for a missing weight or bias) needs one."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _sum(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``t`` summed over ``dims``; over none when ``dims`` is empty (``Tensor.sum(())`` sums all)."""
    return t.sum(dims) if dims else t


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
    _check_config("functional.layer_norm", config)
    _check_input("functional.layer_norm", input)
    shape = list(normalized_shape) if not isinstance(normalized_shape, int) else [normalized_shape]
    if config.exact or not _needs_grad(input, weight, bias) or math.prod(shape) == 0:
        return _torch(F.layer_norm, input, shape, weight, bias, eps)
    return _LayerNorm.run(input, shape, weight, bias, eps, config)[0]


class _RMSNorm(_LayerNorm):
    """Layer norm's backward without centring; ``forward`` (the output's own code, or None) in the bias's place."""

    @staticmethod
    def forward(input, shape, weight, forward, eps, config):
        dims = tuple(range(input.dim() - len(shape), input.dim()))
        x = input.to(compute_dtype(input.dtype))
        rstd = x.square().mean(dims, keepdim=True).add_(eps).rsqrt_()
        normalized = x * rstd
        if forward is not None:
            output = forward(input)
        else:  # torch's rms_norm, operation for operation: the same bits
            output = (normalized if weight is None else normalized * weight).to(input.dtype)
        output, *sketches = _packed(output, normalized, config, input.dim() - len(shape), fresh=True, copies=2)
        return output, rstd, *sketches

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        input, shape, weight, *_, config = inputs
        _save_row_norm(ctx, input, shape, weight, config, outputs, centered=False)


def rms_norm(
    input: Tensor,
    normalized_shape: Sequence[int] | int,
    weight: Tensor | None = None,
    eps: float | None = None,
    config: SketchConfig = _DEFAULT,
    forward: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """RAD ``F.rms_norm``: exact output, unbiased input and weight gradients.

    Saves two independent sketches of the normalized input and the inverse
    root mean square of each row (NOTE [Layer norm from two sketches]).
    ``eps`` None is torch's default, the machine epsilon of the dtype the
    norm is computed in (float32 for float16 and bfloat16 inputs).
    ``forward``, if given, computes the output instead of torch's formula:
    a model's own RMS normalization with ``weight`` and ``eps``, whose
    output then stays bit for bit its own (:class:`radgrad.nn.RMSNormLike`).
    """
    _check_config("functional.rms_norm", config)
    _check_input("functional.rms_norm", input)
    shape = list(normalized_shape) if not isinstance(normalized_shape, int) else [normalized_shape]
    if eps is None:  # torch's: the epsilon of the dtype it computes in
        eps = torch.finfo(compute_dtype(input.dtype)).eps
    if config.exact or not _needs_grad(input, weight) or math.prod(shape) == 0:
        return _torch(forward, input) if forward is not None else _torch(F.rms_norm, input, shape, weight, eps)
    return _RMSNorm.run(input, shape, weight, forward, eps, config)[0]


class _BatchNorm(_RADFunction):
    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, momentum, eps, config):
        output, mean, invstd = torch.native_batch_norm(input, weight, bias, running_mean, running_var, True,
                                                       momentum, eps)
        shape = [1, -1] + [1] * (input.dim() - 2)
        normalized = (input.to(invstd.dtype) - mean.view(shape)).mul_(invstd.view(shape))
        batch_dims = 2 if input.dim() > 2 else 1
        output, *sketches = _packed(output, normalized, config, batch_dims, fresh=True, copies=2)
        return output, invstd, *sketches

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        input, weight, *_, config = inputs
        invstd = outputs[1]
        ctx.mark_non_differentiable(invstd)
        batch_dims = 2 if input.dim() > 2 else 1
        a = _sketch_from(ctx, outputs[2:5], input.shape, config, batch_dims, invstd.dtype)
        b = _sketch_from(ctx, outputs[5:8], input.shape, config, batch_dims, invstd.dtype)
        ctx.dims = (0, *range(2, input.dim()))
        ctx.contiguous = input.is_contiguous()
        save_for_backward(ctx, a, b, invstd.view([1, -1] + [1] * (input.dim() - 2)), weight)

    @staticmethod
    def backward(ctx, grad, *_):
        a, b, invstd, weight = saved_tensors(ctx, unpack=False)
        grads = _backward(grad, a, b, invstd, None if weight is None else weight.view(invstd.shape),
                          ctx.dims, ctx.dims, ctx.needs_input_grad[:3], ctx.contiguous)
        return *grads, None, None, None, None, None


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    config: SketchConfig = _DEFAULT,
) -> Tensor:
    """RAD ``F.batch_norm``: exact output, running statistics and bias gradient; unbiased input and weight gradients.

    In training, saves two independent sketches of the normalized input (one
    row per example and channel) and each channel's inverse standard
    deviation (NOTE [Layer norm from two sketches]). Not training (running
    statistics used), it is torch's function: it saves nothing randomized.
    """
    _check_config("functional.batch_norm", config)
    _check_input("functional.batch_norm", input)
    if config.exact or not (training and _needs_grad(input, weight, bias)) or input.numel() == 0:
        return _torch(F.batch_norm, input, running_mean, running_var, weight, bias, training, momentum, eps)
    return _BatchNorm.run(input, weight, bias, running_mean, running_var, momentum, eps, config)[0]


def _grouped_shape(shape: Sequence[int], groups: int) -> list[int]:
    """``(N, C, *positions)`` as ``(N, groups, C / groups, *positions)``."""
    return [shape[0], groups, shape[1] // groups, *shape[2:]]


class _GroupNorm(_RADFunction):
    """Group normalization whose output ``norm(input)`` computes (torch's group or instance norm), or
    with ``norm`` None torch's group-norm kernel itself (a dense float32 or float64 input)."""

    @staticmethod
    def forward(input, groups, weight, bias, eps, config, norm):
        shape = _grouped_shape(input.shape, groups)
        x = input.to(compute_dtype(input.dtype)).contiguous()
        # torch's kernel gives each group's statistics in one pass (torch.var_mean took five times longer)
        n, c, positions = shape[0], input.shape[1], math.prod(shape[3:])
        if norm is None:
            output, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, positions, groups, eps)
        else:
            output = norm(input)  # torch's output and running statistics
            _, mean, rstd = torch.native_group_norm(x, None, None, n, c, positions, groups, eps)
        x = x.view(shape)
        stats = [n, groups] + [1] * (len(shape) - 2)
        rstd = rstd.view(stats)
        normalized = (x - mean.view(stats)).mul_(rstd)
        output, *sketches = _packed(output, normalized, config, _group_batch_dims(x.shape), fresh=True, copies=2)
        return output, rstd, *sketches

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        input, groups, weight, _, _, config, _ = inputs
        rstd = outputs[1]
        ctx.mark_non_differentiable(rstd)
        shape = _grouped_shape(input.shape, groups)
        batch_dims = _group_batch_dims(shape)
        a = _sketch_from(ctx, outputs[2:5], torch.Size(shape), config, batch_dims, rstd.dtype)
        b = _sketch_from(ctx, outputs[5:8], torch.Size(shape), config, batch_dims, rstd.dtype)
        ctx.input_shape, ctx.contiguous = input.shape, input.is_contiguous()
        save_for_backward(ctx, a, b, rstd, weight)

    @staticmethod
    def backward(ctx, grad, *_):
        a, b, rstd, weight = saved_tensors(ctx, unpack=False)
        shape = a.shape
        per_channel = [1, shape[1], shape[2]] + [1] * (len(shape) - 3)
        needs = ctx.needs_input_grad[0], *ctx.needs_input_grad[2:4]
        grad_input, grad_weight, grad_bias = _backward(
            grad.reshape(shape), a, b, rstd, None if weight is None else weight.view(per_channel),
            tuple(range(2, len(shape))), (0, *range(3, len(shape))), needs, ctx.contiguous)
        return (None if grad_input is None else grad_input.reshape(ctx.input_shape), None,
                None if grad_weight is None else grad_weight.reshape(-1),
                None if grad_bias is None else grad_bias.reshape(-1), None, None, None)


def _group_batch_dims(shape: Sequence[int]) -> int:
    """Rows of a grouped sketch: an example's channel, its positions the entries (a group when the
    input has no positions)."""
    return 3 if len(shape) > 3 else 2


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    config: SketchConfig = _DEFAULT,
) -> Tensor:
    """RAD ``F.group_norm``: exact output and bias gradient, unbiased input and weight gradients.

    Saves two independent sketches of the normalized input (a row per
    example and channel) and the inverse standard deviation of each
    example's group (NOTE [Layer norm from two sketches]).
    """
    _check_config("functional.group_norm", config)
    _check_input("functional.group_norm", input)
    if config.exact or not _needs_grad(input, weight, bias) or input.dim() < 2 or input.numel() == 0 \
            or not isinstance(num_groups, int) or num_groups <= 0 or input.shape[1] % num_groups:
        # torch's own checks and messages for what it refuses
        return _torch(F.group_norm, input, num_groups, weight, bias, eps)

    def norm(x: Tensor) -> Tensor:
        return _torch(F.group_norm, x, num_groups, weight, bias, eps)

    # F.group_norm runs torch's kernel on a dense input, and casts first under autocast
    own = input.is_contiguous() and input.dtype in (torch.float32, torch.float64) \
        and _autocast_dtype(input.device.type) is None
    return _GroupNorm.run(input, num_groups, weight, bias, eps, config, None if own else norm)[0]


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    config: SketchConfig = _DEFAULT,
) -> Tensor:
    """RAD ``F.instance_norm``: exact output, running statistics and bias gradient; unbiased input and
    weight gradients.

    With the input's statistics (``use_input_stats``), it is :func:`group_norm`
    with a group per channel whose output and running statistics are torch's
    own. With the running statistics it is torch's function: it saves
    nothing randomized.
    """
    _check_config("functional.instance_norm", config)
    _check_input("functional.instance_norm", input)

    def norm(x: Tensor) -> Tensor:
        return _torch(F.instance_norm, x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)

    if config.exact or not (use_input_stats and _needs_grad(input, weight, bias)) or input.dim() < 3 \
            or input.numel() == 0:
        return norm(input)
    return _GroupNorm.run(input, input.shape[1], weight, bias, eps, config, norm)[0]
