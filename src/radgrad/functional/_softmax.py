"""RAD softmax, log-softmax and cross-entropy: exact outputs, input gradients from sketches of the probabilities.

NOTE [Softmax from two sketches]
    With ``p = softmax(x)`` along ``dim``, torch's backward is
        dx = p * (grad - sum(p * grad)),
    quadratic in ``p``: one sketch used in both places would be biased by its
    own variance. Two independent sketches A and B, read as
    ``A * (grad - sum(B * grad))``, make it unbiased (as for layer norm:
    NOTE [Layer norm from two sketches]). For ``y = log_softmax(x)`` the
    backward ``dx = grad - p * sum(grad)`` is linear in ``p = exp(y)``, so one
    sketch of ``p`` gives an unbiased estimate. Probabilities lie in [0, 1]
    and each row is quantized against its own range. Softmax's sketches use
    the config's ``softmax_bits`` (4 by default under ``method="quantize"``,
    whose other sketches default to 2): a sharp row (an attention query
    that picks a few keys) in 2 bits rounds its many small probabilities to
    0 or a third of its largest, and the product of two such sketches made a
    ViT's query and key gradients about three times noisier than 4 bits did.
    Log-softmax's and cross-entropy's single, linear sketch keeps ``bits``.
    Cross-entropy over class indices is ``nll_loss(log_softmax(x))`` (what
    torch computes, bit for bit), whose log-probabilities, one per class for
    every position, are a language model's largest saved tensor when its
    vocabulary is large.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from radgrad.functional._base import (
    _DEFAULT, _RADFunction, _autocast_dtype, _check_config, _check_input, _packed, _sketch_from, _torch,
)
from radgrad.saved import save_for_backward, saved_tensors
from radgrad.sketch import Sketch, SketchConfig

__all__ = ["softmax", "log_softmax", "cross_entropy"]


class _Softmax(_RADFunction):
    @staticmethod
    def forward(input, dim, dtype, log, config):
        if log:
            output = torch.log_softmax(input, dim, dtype)
            return _packed(output, output.exp(), config, output.dim() - 1, fresh=True)
        output = torch.softmax(input, dim, dtype)
        # not fresh: a sketch that keeps every entry as it is (a row of one) is the output itself, which
        # setup_context saves as such; returned as a non-differentiable output too, it would stop the gradient
        return _packed(output, output, config, output.dim() - 1, copies=2)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        input, dim, _, log, config = inputs
        output = outputs[0]
        packed = output.shape if log else output  # exp(output) was fresh, the output is not
        sketches = [_sketch_from(ctx, outputs[i:i + 3], packed, config, output.dim() - 1, output.dtype)
                    for i in range(1, len(outputs), 3)]
        ctx.dim, ctx.log, ctx.input_dtype = dim, log, input.dtype
        save_for_backward(ctx, *sketches)

    @staticmethod
    def backward(ctx, grad, *_):
        a, *b = saved_tensors(ctx, unpack=False)
        # a rebuilt estimate is ours to overwrite; an exact sketch's values are the output itself
        p = a.unpack()
        scale = p.mul if a.exact else p.mul_
        if ctx.log:
            grad_input = grad - scale(grad.sum(ctx.dim, keepdim=True))
        else:
            weighted = _weighted_sum(b[0], grad, ctx.dim)
            grad_input = scale(grad - weighted)
        return grad_input.to(ctx.input_dtype), None, None, None, None


def _weighted_sum(sketch: Sketch, grad: Tensor, dim: int) -> Tensor:
    """``(estimate * grad).sum(dim)``, the estimate multiplied in place when it is a rebuilt one (ours);
    it is freed on return, before the caller allocates the input gradient."""
    estimate = sketch.unpack()
    return (estimate.mul(grad) if sketch.exact else estimate.mul_(grad)).sum(dim, keepdim=True)


def _softmax(name: str, log: bool, input: Tensor, dim: int | None, dtype: torch.dtype | None,
             config: SketchConfig) -> Tensor:
    _check_config(f"functional.{name}", config)
    _check_input(f"functional.{name}", input)
    if dim is None:
        raise TypeError(f"radgrad.functional.{name}: dim must be an int, got None")
    fn = torch.log_softmax if log else torch.softmax
    if not log:  # two sketches multiplied: their own bits (NOTE [Softmax from two sketches])
        config = config.for_softmax()
    # under autocast torch runs these in float32 by a policy of its own: left to torch
    if (config.exact or not (input.requires_grad and torch.is_grad_enabled()) or input.numel() == 0
            or _autocast_dtype(input.device.type) is not None):
        return _torch(fn, input, dim, dtype=dtype)
    return _Softmax.run(input, dim, dtype, log, config)[0]


def softmax(input: Tensor, dim: int, dtype: torch.dtype | None = None, config: SketchConfig = _DEFAULT) -> Tensor:
    """RAD ``torch.softmax``: exact output, unbiased input gradient from two sketches of the output.

    NOTE [Softmax from two sketches]. Runs torch's function unchanged with an
    exact config, when no gradient is needed, or under autocast.
    """
    return _softmax("softmax", False, input, dim, dtype, config)


def log_softmax(input: Tensor, dim: int, dtype: torch.dtype | None = None,
                config: SketchConfig = _DEFAULT) -> Tensor:
    """RAD ``torch.log_softmax``: exact output, unbiased input gradient from a sketch of ``exp(output)``.

    NOTE [Softmax from two sketches]. Runs torch's function unchanged with an
    exact config, when no gradient is needed, or under autocast.
    """
    return _softmax("log_softmax", True, input, dim, dtype, config)


class _CrossEntropy(_RADFunction):
    @staticmethod
    def forward(input, target, weight, ignore_index, reduction, config):
        log_probs = torch.log_softmax(input, _class_dim(input.dim()))
        loss = F.nll_loss(log_probs, target, weight, ignore_index=ignore_index, reduction=reduction)
        return _packed(loss, log_probs.exp_(), config, input.dim() - 1, fresh=True)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        input, target, weight, ignore_index, reduction, config = inputs
        sketch = _sketch_from(ctx, outputs[1:], input.shape, config, input.dim() - 1, input.dtype)
        ctx.ignore_index, ctx.reduction = ignore_index, reduction
        save_for_backward(ctx, sketch, target, weight)

    @staticmethod
    def backward(ctx, grad, *_):
        sketch, target, weight = saved_tensors(ctx, unpack=False)
        dim = _class_dim(len(sketch.shape))
        # d loss / d input = a * (p - onehot(target)), a = grad * weight[target] (/ total weight), 0 where ignored
        valid = target != ctx.ignore_index
        index = target.where(valid, 0).unsqueeze(dim)
        w = valid.to(grad.dtype) if weight is None else weight[index.squeeze(dim)].to(grad.dtype) * valid
        if ctx.reduction == "mean":
            a = (grad * w).div_(w.sum()).where(w != 0, 0)  # nothing to average over: zero, as torch gives
        else:
            a = grad * w
        a = a.unsqueeze(dim)
        p = sketch.unpack()
        grad_input = p.mul(a) if sketch.exact else p.mul_(a)
        return grad_input.scatter_add_(dim, index, -a), None, None, None, None, None


def _class_dim(ndim: int) -> int:
    """The class dimension of ``F.cross_entropy``'s input of ``ndim`` dimensions."""
    return 1 if ndim > 1 else 0


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0,
                  config: SketchConfig = _DEFAULT) -> Tensor:
    """RAD ``F.cross_entropy``: exact loss, unbiased input gradient from a sketch of the probabilities.

    For class-index targets the loss is torch's ``nll_loss(log_softmax(input))``
    over the class dimension, bit for bit, and only a sketch of the
    probabilities is saved, with the targets (the input gradient is
    ``p - onehot(target)``, scaled: linear in ``p``). Runs torch's function
    unchanged for probability targets, with ``label_smoothing``, under
    autocast, with an exact config, or when no gradient is needed.
    """
    _check_config("functional.cross_entropy", config)
    _check_input("functional.cross_entropy", input)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"radgrad.functional.cross_entropy: reduction must be 'mean', 'sum' or 'none', "
                         f"got {reduction!r}")
    if (config.exact or not (input.requires_grad and torch.is_grad_enabled()) or target.is_floating_point()
            or label_smoothing != 0.0 or input.dim() == 0 or input.numel() == 0
            or (weight is not None and weight.requires_grad)
            or _autocast_dtype(input.device.type) is not None):
        return _torch(F.cross_entropy, input, target, weight, ignore_index=ignore_index, reduction=reduction,
                      label_smoothing=label_smoothing)
    return _CrossEntropy.run(input, target, weight, ignore_index, reduction, config)[0]
