"""RAD elementwise activations and dropout.

An elementwise activation ``y = f(x)`` needs, for its backward pass, only its
derivative ``f'(x)``, which enters the input gradient ``grad * f'(x)``
linearly. So the derivative is computed in the forward pass (a fused torch
kernel for the common activations) and stored as a sketch: the input gradient is an unbiased estimate,
the output exact. Dropout keeps its mask as one bit per entry: exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from radgrad import bits
from radgrad.functional._base import (
    _DEFAULT, _RADFunction, _check_config, _check_input, _packed, _sketch_from, _torch,
)
from radgrad.saved import save_for_backward, saved_tensors
from radgrad.sketch import SketchConfig

__all__ = ["elementwise", "dropout", "fused_derivative", "FUSED"]


def _ones_like(x: Tensor) -> Tensor:
    return torch.ones((), dtype=x.dtype, device=x.device).expand(x.shape)


#: Elementwise functions whose derivative torch computes in one fused kernel.
FUSED: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "gelu": (F.gelu, lambda x: torch.ops.aten.gelu_backward(_ones_like(x), x)),
    "gelu-tanh": (lambda x: F.gelu(x, approximate="tanh"),
                  lambda x: torch.ops.aten.gelu_backward(_ones_like(x), x, approximate="tanh")),
    "silu": (F.silu, lambda x: torch.ops.aten.silu_backward(_ones_like(x), x)),
    "mish": (F.mish, lambda x: torch.ops.aten.mish_backward(_ones_like(x), x)),
    "tanh": (torch.tanh, lambda x: torch.ops.aten.tanh_backward(_ones_like(x), torch.tanh(x))),
    "sigmoid": (torch.sigmoid, lambda x: torch.ops.aten.sigmoid_backward(_ones_like(x), torch.sigmoid(x))),
    "exp": (torch.exp, torch.exp),
    "softplus": (F.softplus, lambda x: torch.ops.aten.softplus_backward(_ones_like(x), x, 1.0, 20.0)),
}


def fused_derivative(fn: Callable[[Tensor], Tensor]) -> str | None:
    """The name in :data:`FUSED` of the function ``fn`` computes, or None.

    Decided on a float64 probe over [-6, 6] (agreement to 1e-12): a model's own
    formula for GELU gets torch's GELU derivative, which differs from the
    derivative of that formula by float rounding only.
    """
    x = torch.linspace(-6, 6, 193, dtype=torch.float64)
    try:
        with torch.no_grad():
            y = fn(x)
    except Exception:  # not callable on a 1-d float64 tensor: no fused kernel
        return None
    for name, (forward, _) in FUSED.items():
        if isinstance(y, Tensor) and y.shape == x.shape and torch.allclose(y, forward(x), rtol=1e-12, atol=1e-14):
            return name
    return None


def _unhooked(t: Tensor) -> Tensor:
    return t


def _value_and_derivative(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """``fn(x)`` and its derivative by autograd, from one call of ``fn``: a random ``fn`` (a model's
    drop path, say) gets the derivative of the very draw its output was made with."""
    # torch.autograd.grad takes any function eagerly, but dynamo cannot trace it. Gradients are
    # on inside either: fn's own torch calls escape a converted model's Route only because
    # _RADFunction.run turns torch-function dispatch off (NOTE [No torch-function dispatch inside an op])
    if torch.compiler.is_compiling():
        y, pull = torch.func.vjp(fn, x)
        return y, pull(_ones_like(y))[0]
    # the graph lives for this call only: what it saves must not reach a caller's saved-tensor
    # hooks (an offload to CPU would copy it; radgrad.memory would count the input as saved)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_unhooked, _unhooked):
        leaf = x.detach().requires_grad_()
        y = fn(leaf)
        (derivative,) = torch.autograd.grad(y, leaf, _ones_like(y))
    return y.detach(), derivative


class _Elementwise(_RADFunction):
    @staticmethod
    def forward(input, fn, derivative, config):
        if derivative is None:
            output, d = _value_and_derivative(fn, input)
        else:
            output, d = fn(input), derivative(input)
        return _packed(output, d.to(output.dtype), config, max(input.dim() - 1, 0), fresh=True)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        config = inputs[-1]
        output = outputs[0]
        save_for_backward(ctx, _sketch_from(ctx, outputs[1:], output.shape, config,
                                            max(output.dim() - 1, 0), output.dtype))

    @staticmethod
    def backward(ctx, grad, *_):
        (sketch,) = saved_tensors(ctx, unpack=False)
        derivative = sketch.unpack()
        # a rebuilt estimate is ours to overwrite (one input-sized tensor less at once); an exact
        # sketch's values are the saved tensor itself, which a second backward pass reads again
        if sketch.exact or derivative.dtype != grad.dtype or derivative.shape != grad.shape:
            return grad * derivative, None, None, None
        return derivative.mul_(grad), None, None, None


def elementwise(fn: Callable[[Tensor], Tensor], input: Tensor, config: SketchConfig = _DEFAULT,
                derivative: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``fn(input)`` for an elementwise ``fn``, saving a sketch of ``fn'(input)``.

    Exact: the output. Estimated (unbiased): the gradient with respect to
    ``input``, ``grad * fn'(input)`` with the derivative unpacked from its
    sketch (each position of the leading dimensions is a row). The
    derivative is ``derivative(input)`` if given (for example a kernel from
    :func:`fused_derivative`; ``fn`` must then be deterministic), else
    computed by autograd in the forward pass from the same call of ``fn``
    that made the output, so a random ``fn`` (a drop path) gets the
    derivative of its own draw. ``fn`` must act entry by entry:
    :func:`radgrad.convert` checks a module's Jacobian is diagonal before
    routing it here. With an exact config or no gradient needed,
    ``fn(input)`` runs as it is.
    """
    _check_config("functional.elementwise", config)
    _check_input("functional.elementwise", input)
    if config.exact or not (input.requires_grad and torch.is_grad_enabled()):
        return _torch(fn, input)
    return _Elementwise.run(input, fn, derivative, config)[0]


class _Dropout(_RADFunction):
    @staticmethod
    def forward(input, p):
        return torch.ops.aten.native_dropout(input, p, True)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        ctx.scale = 1.0 / (1.0 - inputs[1])
        ctx.mark_non_differentiable(outputs[1])
        save_for_backward(ctx, bits.pack(outputs[1]))

    @staticmethod
    def backward(ctx, grad, _):
        (mask,) = saved_tensors(ctx, unpack=False)
        return bits.masked_grad(grad, mask).mul_(ctx.scale), None


def dropout(input: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Exact ``F.dropout`` that saves its mask as one bit per entry instead of one byte."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"radgrad.functional.dropout: p must be between 0 and 1, got {p}")
    if not (training and 0.0 < p < 1.0 and input.requires_grad and torch.is_grad_enabled()):
        return F.dropout(input, p, training)
    return _Dropout.run(input, p)[0]
