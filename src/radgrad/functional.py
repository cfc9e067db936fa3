"""RAD autograd functions: linear, convolution, ReLU and pooling.

Nothing here knows about modules: each public function takes tensors and a
:class:`~radgrad.sketch.SketchConfig` and is a drop-in for its
``torch.nn.functional`` twin.

Contract of every function here:
    * the forward value is exactly torch's;
    * the gradient with respect to the input is exactly torch's (it needs the
      weight, the 1-bit ReLU mask or the pooling indices, never the input);
    * the bias gradient is exact;
    * only the weight gradient is an estimate (unbiased): it is computed from
      an unpacked sketch of the input (:mod:`radgrad.sketch`);
    * with an exact config (``keep=1``, no ``bits``), with gradients disabled, or when the weight
      needs no gradient, the torch function itself runs, unchanged;
    * a second derivative through a randomized op raises RuntimeError.

Under CPU or CUDA autocast the inputs are cast as autocast would cast them
for the torch op, and the op runs in that dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from radgrad import bits
from radgrad.saved import save_for_backward, saved_tensors
from radgrad.sketch import Sketch, SketchConfig, pack, tie, unpack_rows

__all__ = ["linear", "conv", "relu", "avg_pool1d", "avg_pool2d", "max_pool2d", "recurrence"]

_DEFAULT = SketchConfig()
_EXACT = SketchConfig(keep=1.0)


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


def _cast(dtype: torch.dtype, *tensors: Tensor | None) -> list[Tensor | None]:
    # Autocast casts floating tensors other than float64 (see aten's cached_cast).
    return [
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    ]


def _apply(fn: Callable[..., Tensor], input: Tensor, weight: Tensor, bias: Tensor | None, *args) -> Tensor:
    """Run a RAD op as autocast would run its torch twin."""
    device_type = input.device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return fn(input, weight, bias, *args)
    input, weight, bias = _cast(torch.get_autocast_dtype(device_type), input, weight, bias)
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
#   compiled model draws in the order, hence the numbers, of the eager model.
#   The public wrappers return the main output.
def _packed(output: Tensor, x: Tensor, config: SketchConfig, batch_dims: int) -> tuple[Tensor | None, ...]:
    """``output`` tied to ``pack(x)``, then the sketch's (values, state, scale); values None when it is ``x``."""
    sketch = pack(x, config, batch_dims=batch_dims)
    return tie(output, sketch), (None if sketch.exact else sketch.values), sketch.state, sketch.scale


def _sketch_from(ctx, parts: Sequence[Tensor | None], x: Tensor, config: SketchConfig,
                    batch_dims: int) -> Sketch:
    """The sketch of ``x`` whose tensors ``forward`` returned, its outputs marked non-differentiable."""
    values, state, scale = parts
    ctx.mark_non_differentiable(*(t for t in parts if t is not None))
    return Sketch(x if values is None else values, state, scale, x.shape, x.dtype, batch_dims, config)


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
    """

    generate_vmap_rule = True
    _classic: type[Function]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)

        def forward(ctx, *args):
            output = cls.forward(*args)
            cls.setup_context(ctx, args, output)
            return output

        cls._classic = type(cls.__name__, (Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(cls.backward)})

    @classmethod
    def run(cls, *args):
        if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
            return cls.apply(*args)
        return cls._classic.apply(*args)


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
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_input = grad.matmul(weight) if need_input else None
        grad_weight = None
        if need_weight:
            rows, d = grad2d.shape[0], sketch.shape[-1]
            for lo, hi in _blocks(sketch, rows, d):
                part = unpack_rows(sketch, lo, hi)
                if grad_weight is None:
                    grad_weight = grad2d[lo:hi].t().mm(part)
                else:
                    grad_weight.addmm_(grad2d[lo:hi].t(), part)
        grad_bias = grad2d.sum(0) if need_bias else None
        return grad_input, grad_weight, grad_bias, None


# NOTE [Unpacking in blocks]
#   A backward pass rebuilds a sketch's dense estimate to multiply it with
#   the output gradient. Rebuilt whole, the estimate of the largest layer's
#   input, plus its indices, would sit in memory at once and could lift the
#   step's peak above the exact model's (the MNIST MLP at batch 1000: +10%).
#   So estimates of more than _BLOCK entries are rebuilt and multiplied a
#   block of rows (or examples) at a time, summing the weight gradient.
_BLOCK = 2**18


def _blocks(sketch: Sketch, rows: int, width: int, unit: int = 1) -> list[tuple[int, int]]:
    """Row ranges, whole multiples of ``unit`` rows, of at most about ``_BLOCK`` entries each."""
    if sketch.exact or rows * width <= _BLOCK:
        return [(0, rows)]
    step = max(1, _BLOCK // (width * unit)) * unit
    return [(lo, min(rows, lo + step)) for lo in range(0, rows, step)]


def linear(
    input: Tensor, weight: Tensor, bias: Tensor | None = None, config: SketchConfig = _DEFAULT
) -> Tensor:
    """RAD ``F.linear``: exact output, weight gradient from a sketch of ``input``.

    Each position of every leading dimension of ``input`` is a row of the
    sketch (NOTE [Sketch layout] in :mod:`radgrad.sketch`).
    """
    _check_input("functional.linear", input)
    if not _randomized(config, weight):
        return F.linear(input, weight, bias)
    return _apply(_Linear.run, input, weight, bias, config)[0]


class _Conv(_RADFunction):
    @staticmethod
    def forward(input, weight, bias, stride, padding, dilation, groups, config):
        zeros = [0] * len(stride)
        output = torch.convolution(input, weight, bias, stride, padding, dilation, False, zeros, groups)
        return _packed(output, input, config, 2)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        input, weight, _, stride, padding, dilation, groups, config = inputs
        ctx.options = (stride, padding, dilation, groups)
        save_for_backward(ctx, _sketch_from(ctx, outputs[1:], input, config, 2), weight)

    @staticmethod
    def backward(ctx, grad, *_):
        sketch, weight = saved_tensors(ctx, unpack=False)
        stride, padding, dilation, groups = ctx.options
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        options = (stride, padding, dilation, False, [0] * len(stride), groups)
        bias_sizes = [weight.shape[0]] if need_bias else None
        shape = sketch.shape
        blocks = _blocks(sketch, shape[0] * shape[1], math.prod(shape[2:]), unit=shape[1])
        if len(blocks) == 1:
            grads = torch.ops.aten.convolution_backward(
                grad, sketch.unpack(), weight, bias_sizes, *options, [need_input, need_weight, need_bias])
            return (*grads, None, None, None, None, None)
        # NOTE [Unpacking in blocks], by examples: convolution_backward reads the
        # input only for the weight gradient, so a stride-0 placeholder serves the rest.
        placeholder = grad.new_zeros(()).expand(shape)
        grad_input, _, grad_bias = torch.ops.aten.convolution_backward(
            grad, placeholder, weight, bias_sizes, *options, [need_input, False, need_bias])
        grad_weight = None
        for lo, hi in blocks:
            first, last = lo // shape[1], hi // shape[1]
            part = unpack_rows(sketch, lo, hi).view(last - first, *shape[1:])
            part = torch.ops.aten.convolution_backward(
                grad[first:last], part, weight, None, *options, [False, True, False])[1]
            grad_weight = part if grad_weight is None else grad_weight.add_(part)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


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
    _check_input("functional.conv", input)
    n = weight.dim() - 2
    if not _randomized(config, weight):
        return _TORCH_CONV[n](input, weight, bias, stride, padding, dilation, groups)
    unbatched = input.dim() == n + 1
    if unbatched:
        input = input.unsqueeze(0)
    stride, dilation = _tuple(stride, n), _tuple(dilation, n)
    input, padding = _explicit_padding(input, padding, weight, stride, dilation)
    out = _apply(_Conv.run, input, weight, bias, stride, padding, dilation, groups, config)[0]
    return out.squeeze(0) if unbatched else out


_TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _tuple(value: Sequence[int] | int, n: int) -> list[int]:
    return [value] * n if isinstance(value, int) else list(value)


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


class _AvgPool2d(_RADFunction):
    @staticmethod
    def forward(input, options):
        return F.avg_pool2d(input, *options)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, ctx.options = inputs
        ctx.shape = input.shape

    @staticmethod
    def backward(ctx, grad):
        # avg_pool2d_backward reads only the input's shape: pass a stride-0 placeholder.
        placeholder = grad.new_zeros(()).expand(ctx.shape)
        return torch.ops.aten.avg_pool2d_backward(grad, placeholder, *ctx.options), None


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
    options = (_tuple(kernel_size, 2), _tuple(kernel_size if stride is None else stride, 2),
               _tuple(padding, 2), ceil_mode, count_include_pad, divisor_override)
    if not (input.requires_grad and torch.is_grad_enabled()):
        return F.avg_pool2d(input, *options)
    return _AvgPool2d.run(input, options)


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


class _MaxPool2d(_RADFunction):
    @staticmethod
    def forward(input, kernel, stride, padding, dilation, ceil_mode):
        output, index = torch.ops.aten.max_pool2d_with_indices(
            input, kernel, stride, padding, dilation, ceil_mode
        )
        return output, index

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        input, kernel, stride, padding, dilation, _ = inputs
        ctx.shape, ctx.options = input.shape, (kernel, stride, padding, dilation)
        ctx.mark_non_differentiable(outputs[1])
        ctx.save_for_backward(_window_offsets(outputs[1], input.shape[-1], ctx.options))

    @staticmethod
    def backward(ctx, grad, _):
        (offsets,) = ctx.saved_tensors
        index = _plane_index(offsets, ctx.shape[-1], ctx.options)
        planes, positions = math.prod(grad.shape[:-2]), grad.shape[-2] * grad.shape[-1]
        grad_input = grad.new_zeros(planes, ctx.shape[-2] * ctx.shape[-1])
        grad_input.scatter_add_(1, index.reshape(planes, positions), grad.reshape(planes, positions))
        return grad_input.view(ctx.shape), None, None, None, None, None


# NOTE [Compact max-pool indices]
#   torch saves int64 indices into the input plane (plus the whole input).
#   The backward pass needs only which element of its window each output took:
#   an offset below kernel_h * kernel_w, one byte for windows up to 256
#   entries. The plane index is rebuilt from the output position.
def _window_origin(shape_out: torch.Size, options, device) -> tuple[Tensor, Tensor]:
    _, stride, padding, _ = options
    rows = torch.arange(shape_out[-2], device=device).mul_(stride[0]).sub_(padding[0])
    cols = torch.arange(shape_out[-1], device=device).mul_(stride[1]).sub_(padding[1])
    return rows.unsqueeze(1), cols


def _window_offsets(index: Tensor, width: int, options) -> Tensor:
    kernel, _, _, dilation = options
    top, left = _window_origin(index.shape, options, index.device)
    dr = torch.div(index, width, rounding_mode="floor").sub_(top).div_(dilation[0], rounding_mode="floor")
    dc = index.remainder(width).sub_(left).div_(dilation[1], rounding_mode="floor")
    size = kernel[0] * kernel[1]
    dtype = torch.uint8 if size <= 256 else torch.int16 if size <= 2**15 else torch.int32
    return dr.mul_(kernel[1]).add_(dc).to(dtype)


def _plane_index(offsets: Tensor, width: int, options) -> Tensor:
    kernel, _, _, dilation = options
    top, left = _window_origin(offsets.shape, options, offsets.device)
    offsets = offsets.long()
    row = torch.div(offsets, kernel[1], rounding_mode="floor").mul_(dilation[0]).add_(top)
    col = offsets.remainder(kernel[1]).mul_(dilation[1]).add_(left)
    return row.mul_(width).add_(col)


def max_pool2d(
    input: Tensor,
    kernel_size: Sequence[int] | int,
    stride: Sequence[int] | int | None = None,
    padding: Sequence[int] | int = 0,
    dilation: Sequence[int] | int = 1,
    ceil_mode: bool = False,
) -> Tensor:
    """Exact ``F.max_pool2d`` that saves one small offset per output, not the input."""
    options = (_tuple(kernel_size, 2), _tuple(kernel_size if stride is None else stride, 2),
               _tuple(padding, 2), _tuple(dilation, 2), ceil_mode)
    if not (input.requires_grad and torch.is_grad_enabled()):
        return F.max_pool2d(input, *options)
    return _MaxPool2d.run(input, *options)[0]


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


def _chunks(steps: int) -> list[tuple[int, int]]:
    return [(lo, min(steps, lo + _RECURRENCE_CHUNK)) for lo in range(0, steps, _RECURRENCE_CHUNK)]


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
    if nonlinearity not in ("relu", "tanh"):
        raise ValueError(f"radgrad.functional.recurrence: nonlinearity must be 'relu' or 'tanh', got {nonlinearity!r}")
    if v.shape[0] == 0:
        raise ValueError("radgrad.functional.recurrence: expected a sequence of at least one time step, got 0")
    relu = nonlinearity == "relu"
    if not (weight.requires_grad and torch.is_grad_enabled()):
        config = _EXACT  # nothing reads the states but dL/dW: store no sketch
    output, last = _Recurrence.run(v, h0, weight, relu, config)[:2]
    return output, last
