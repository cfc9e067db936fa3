"""What every RAD autograd function shares: the base class, packing in forward, casting, blocks."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from radgrad.sizes import known, row_blocks
from radgrad.sketch import Sketch, SketchConfig, check_config, pack_copies, tie

_DEFAULT = SketchConfig()
_EXACT = SketchConfig(keep=1.0)


# NOTE [Exact paths are final]
#   While a converted model trains, radgrad.route.Route sends F.linear,
#   F.layer_norm, F.gelu, ... to their RAD twins with the model's config. When
#   a radgrad op takes its exact path (an exact config, or nothing it would
#   sketch needs a gradient) the torch function it calls must stay torch's:
#   routed, a layer made exact by hand or by radgrad.allocate would be
#   sketched with the model's config after all. ``_torch`` marks such calls.
_exact_calls = [0]


def _torch(fn: Callable[..., Tensor], *args, **kwargs) -> Tensor:
    """``fn(*args, **kwargs)``, never routed to a RAD twin (NOTE [Exact paths are final])."""
    _exact_calls[0] += 1
    try:
        return fn(*args, **kwargs)
    finally:
        _exact_calls[0] -= 1


def routing_paused() -> bool:
    """True inside an exact path of a radgrad op (NOTE [Exact paths are final])."""
    return _exact_calls[0] > 0


def _randomized(config: SketchConfig, weight: Tensor) -> bool:
    return not config.exact and weight.requires_grad and torch.is_grad_enabled()


def _check_input(name: str, input: Tensor) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"radgrad.{name}: input must be a Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(
            f"radgrad.{name}: input must be a floating-point tensor "
            f"(float16, bfloat16, float32 or float64), got {input.dtype}"
        )


def _check_config(name: str, config: SketchConfig) -> None:
    check_config(f"radgrad.{name}", config)


def _lives_on(t: Tensor) -> bool:
    """Whether ``t`` or the tensor it views is a parameter or a leaf that needs a gradient: its
    storage lives on whatever is saved (NOTE [Products of two activations])."""
    root = t if t._base is None else t._base
    return isinstance(root, torch.nn.Parameter) or (root.is_leaf and root.requires_grad)


def _cast(dtype: torch.dtype, *tensors: Tensor | None) -> list[Tensor | None]:
    # Autocast casts floating tensors other than float64 (see aten's cached_cast).
    return [
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    ]


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on ``device_type``, or None when it is off."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _apply(fn: Callable[..., Tensor], input: Tensor, weight: Tensor, bias: Tensor | None, *args) -> Tensor:
    """Run a RAD op as autocast would run its torch twin."""
    device_type = input.device.type
    dtype = _autocast_dtype(device_type)
    if dtype is None:
        return fn(input, weight, bias, *args)
    input, weight, bias = _cast(dtype, input, weight, bias)
    with torch.autocast(device_type, enabled=False):
        return fn(input, weight, bias, *args)


# NOTE [Packing in the forward pass]
#   A RAD function packs its sketches in ``forward`` and returns their tensors
#   as extra, non-differentiable outputs, which ``setup_context`` saves. An
#   output is computed in the forward pass by definition, so under
#   torch.compile the partitioner can neither move a draw to the backward pass
#   nor keep the dense input instead of its sketch (NOTE [Draws are saved,
#   never redrawn] in radgrad.rng). The main output is also tied to the draws
#   (radgrad.tie): the next layer's draw then waits for this one, and a
#   compiled chain of layers draws in the order, hence the numbers, of the eager
#   model (parallel branches excepted: NOTE [Draws are saved, never redrawn]).
#   The public wrappers return the main output.
def _packed(output: Tensor, x: Tensor, config: SketchConfig, batch_dims: int,
            fresh: bool = False, copies: int = 1) -> tuple[Tensor | None, ...]:
    """``output`` tied to ``pack(x)``, then the sketch's (values, state, scale); for ``copies``
    independent sketches (:func:`radgrad.sketch.pack_copies`), the three of each in turn.

    The values are None when the sketch is ``x`` itself and ``x`` is an input
    of the op (an op cannot return its input as a new output); ``fresh=True``
    says ``x`` was computed inside the op, and its values are always returned.
    """
    sketches = pack_copies(x, config, batch_dims=batch_dims, copies=copies)
    parts = []
    for sketch in sketches:
        parts += [None if sketch.exact and not fresh else sketch.values, sketch.state, sketch.scale]
    return tie(output, *sketches), *parts


def _sketch_from(ctx, parts: Sequence[Tensor | None], x: Tensor | torch.Size, config: SketchConfig,
                 batch_dims: int, dtype: torch.dtype | None = None) -> Sketch:
    """The sketch whose tensors ``forward`` returned, its outputs marked non-differentiable.

    ``x`` is the packed tensor when it was an input of the op, or just its
    shape (with ``dtype``) when it was computed inside (``fresh``).
    """
    values, state, scale = parts
    ctx.mark_non_differentiable(*(t for t in parts if t is not None))
    if isinstance(x, Tensor):
        shape, dtype = x.shape, x.dtype
        values = x if values is None else values
    else:
        shape = x
    return Sketch(values, state, scale, shape, dtype, batch_dims, config)


# NOTE [Outputs are not views]
#   F.linear on a batch of rows (and so a RAD linear layer) returns a view of the
#   product it computed. Autograd forbids modifying in place a view that a
#   custom Function made inside its forward, which torch's own ops allow: a
#   model's ``h[mask] = embedding`` (wav2vec2's time masking) or ``h += x`` on a
#   converted layer's output would raise. Such an output is returned as a
#   tensor of its own over the same memory (``_unsafe_view``, as ATen's matmul
#   does): nothing else holds that view, so autograd loses nothing by not
#   knowing it was one.
def _owning(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward``, its main output never a view of a tensor it made (NOTE [Outputs are not views])."""

    @functools.wraps(forward)
    def owning(*args):
        outputs = forward(*args)
        if torch.compiler.is_compiling():  # traced, the views are functionalized away
            return outputs
        main = outputs[0] if isinstance(outputs, tuple) else outputs
        if not (isinstance(main, Tensor) and main._is_view()) or any(
                isinstance(a, Tensor) and main._base is (a._base if a._is_view() else a) for a in args):
            return outputs
        main = torch.ops.aten._unsafe_view(main, main.shape)
        return (main, *outputs[1:]) if isinstance(outputs, tuple) else main
    return owning


class _RADFunction(Function):
    """Base of radgrad's autograd functions: ``forward``, ``setup_context`` and ``backward``.

    NOTE [Two ways to apply]
        Written once in the ``setup_context`` style, which torch.func needs
        (``grad``, ``vmap``, ``jvp``). That style binds the arguments to
        ``forward``'s signature on every call, which costs tens of microseconds
        on a CPU: a tenth of a small layer's step. So :meth:`run` applies an
        eager twin made from the very same three functions in the classic
        style, and the class itself only under torch.func transforms and
        torch.compile, where the binding costs nothing at run time.

    NOTE [No zero gradients for packed tensors]
        The packed tensors a function returns (NOTE [Packing in the forward
        pass]) are non-differentiable outputs, and by default autograd hands
        ``backward`` a zero tensor of each one's shape: on a ResNet step, 143
        tensors allocated and filled for nothing. The eager twin turns that
        off (``ctx.set_materialize_grads(False)``) unless the function has more
        than one differentiable output (``_materialize_grads = True``); its
        ``backward`` then receives None for them, and ignores them either way.
        The main output's gradient is None too when a later op returned None
        for it: the twin then returns no gradients without calling
        ``backward``. The class itself (torch.func, torch.compile) keeps
        torch's default.
    """

    generate_vmap_rule = True
    _classic: type[Function]
    _materialize_grads = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            cls.forward = staticmethod(_owning(cls.__dict__["forward"].__func__))

        def forward(ctx, *args):
            if not cls._materialize_grads:
                ctx.set_materialize_grads(False)
            output = cls.forward(*args)
            cls.setup_context(ctx, args, output)
            return output

        def backward(ctx, grad, *rest):
            if grad is None:  # no gradient reached the output (a later op returned None for it)
                return (None,) * len(ctx.needs_input_grad)
            return cls.backward(ctx, grad, *rest)

        cls._classic = type(cls.__name__, (Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(backward)})

    @classmethod
    def run(cls, *args):
        if torch._C._are_functorch_transforms_active():
            return cls.apply(*args)
        # NOTE [No torch-function dispatch inside an op]
        #   A converted model's forward runs under radgrad.route.Route, a
        #   TorchFunctionMode, which would see every tensor op a RAD op makes
        #   (a transformer step: thousands, about 1.4 us each). Those calls
        #   are never routed (gradients are off inside forward), and every
        #   tensor an op creates names its device, so they skip the dispatch.
        #   Under torch.compile dynamo would trace the mode's handler for each
        #   of them: skipped, a one-layer Mistral traced in 9.1 s, not 12.1.
        with torch._C.DisableTorchFunction():
            return cls.apply(*args) if torch.compiler.is_compiling() else cls._classic.apply(*args)


# NOTE [Unpacking in blocks]
#   A backward pass rebuilds a sketch's dense estimate to multiply it with
#   the output gradient. Rebuilt whole, the estimate of the largest layer's
#   input, plus its indices, would sit in memory at once and could lift the
#   step's peak above the exact model's (the MNIST MLP at batch 1000: +10%).
#   So estimates of more than _BLOCK entries are rebuilt and multiplied a
#   block of rows (or examples) at a time, summing the weight gradient
#   (one block for sizes torch.compile keeps symbolic: NOTE [Sizes under
#   dynamic shapes] in radgrad.sizes).
_BLOCK = 2**18


def _blocks(sketch: Sketch, rows: int, width: int, unit: int = 1) -> list[tuple[int, int]]:
    """Row ranges, whole multiples of ``unit`` rows, of at most about ``_BLOCK`` entries each."""
    if sketch.exact or not known(rows * width > _BLOCK):
        return [(0, rows)]
    return row_blocks(rows, max(1, _BLOCK // (width * unit)) * unit)


def _tuple(value: Sequence[int] | int, n: int) -> list[int]:
    return [value] * n if isinstance(value, int) else list(value)

