"""Functional calls inside a converted model, routed to their RAD twins.

Module surgery reaches layers; it cannot reach the torch functions a model's
own code calls (Hugging Face attention calls ``F.scaled_dot_product_attention``,
``nn.MultiheadAttention`` calls ``F.multi_head_attention_forward``,
``nn.BatchNorm2d`` calls ``F.batch_norm``, ``nn.GroupNorm`` ``F.group_norm``).
:func:`radgrad.convert` therefore wraps the forward pass of the converted
model in :class:`Route`, a ``TorchFunctionMode`` active only while it trains
with gradients on, which sends these calls to :mod:`radgrad.functional`:

    ================================  ================================================
    torch function                    RAD twin (what it saves)
    ================================  ================================================
    ``F.linear``                      :func:`~radgrad.functional.linear` (sketch of the input)
    ``F.conv1d``, ``conv2d``, ``conv3d``  :func:`~radgrad.functional.conv` (the same)
    ``F.conv_transpose1d`` ... ``3d``  :func:`~radgrad.functional.conv_transpose` (the same)
    ``F.scaled_dot_product_attention``  exact q, k; sketch of v; mask bits
    ``F.dropout``                     mask as bits (exact)
    ``F.relu``                        mask as bits (exact)
    ``F.layer_norm``, ``F.batch_norm``  two sketches of the normalized input
    ``F.group_norm``, ``F.instance_norm``  the same
    ``F.rms_norm``                    the same
    ``F.multi_head_attention_forward``  RAD projections and attention (``need_weights=False``)
    ``F.gelu``, ``F.silu``, ``F.mish``  sketch of the derivative
    ``torch.exp``, ``tanh``, ``sigmoid``  the same (torch's own on a parameter)
    ``F.softplus``                    the same
    ``torch.matmul``, ``bmm``, ``@``  a sketch of each operand but a parameter
    ``torch.baddbmm``                 the same; the added tensor needs nothing
    ``torch.einsum`` of two tensors   the same (subscripts as ``functional.einsum`` takes them)
    ``torch.mul``, ``*``              the same, for operands the size of the output
    ``-``, ``+``, ``/``, ``torch.cat``  torch's op, noted when attention may rebuild its output
    ``contiguous()``, ``clone()``     the same
    ``softmax``                       two sketches of the output
    ``log_softmax``                   a sketch of ``exp`` of the output
    ``F.cross_entropy``               the same, with class-index targets
    ================================  ================================================

Tensor methods (``x.softmax(-1)``, ``q @ k.mT``) are routed like the functions.

Calls made inside radgrad's own ops run with gradients off, and those of
their exact paths are marked, so both fall through to torch unchanged: a
layer set exact (by hand or by :func:`radgrad.allocate`) stays exact. In eval mode or under ``torch.no_grad`` nothing is
routed: the model computes exactly what torch computes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from radgrad import functional as RF
from radgrad.functional import _base
from radgrad.functional._base import routing_paused
from radgrad.functional._elementwise import FUSED
from radgrad.functional._source import record_op
from radgrad.sketch import SketchConfig

__all__ = ["Route", "ROUTED"]


def _linear(config, input, weight, bias=None):
    return RF.linear(input, weight, bias, config)


def _sdpa(config, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return RF.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                           config)


def _batch_norm(config, input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                eps=1e-5):
    return RF.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, config)


def _mha(config, *args, **kwargs):
    return RF.multi_head_attention_forward(*args, **kwargs, config=config)


def _conv(config, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return RF.conv(input, weight, bias, stride, padding, dilation, groups, config)


def _conv_transpose(config, input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    return RF.conv_transpose(input, weight, bias, stride, padding, output_padding, groups, dilation, config)


def _relu(config, input, inplace=False):
    return RF.relu(input)


def _dropout(config, input, p=0.5, training=True, inplace=False):
    return RF.dropout(input, p, training)


def _layer_norm(config, input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return RF.layer_norm(input, normalized_shape, weight, bias, eps, config)


def _group_norm(config, input, num_groups, weight=None, bias=None, eps=1e-5):
    return RF.group_norm(input, num_groups, weight, bias, eps, config)


def _instance_norm(config, input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                   momentum=0.1, eps=1e-5):
    return RF.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps, config)


def _rms_norm(config, input, normalized_shape, weight=None, eps=None):
    return RF.rms_norm(input, normalized_shape, weight, eps, config)


def _activation(name, config, input, *args, **kwargs):
    kwargs.pop("inplace", None)
    if name == "gelu" and (args[:1] == ("tanh",) or kwargs.get("approximate") == "tanh"):
        name = "gelu-tanh"
    forward, derivative = FUSED[name]
    return RF.elementwise(forward, input, config, derivative)


def _function(name, func, config, input, *args, **kwargs):
    """A torch elementwise function (``torch.exp``, ``torch.tanh``...) as :func:`RF.elementwise` with
    its derivative from :data:`FUSED`; torch's own on a parameter (nothing to gain), with options or
    ``out``."""
    if args or kwargs or not _floating(input) or _parameter(input):
        return func(input, *args, **kwargs)
    forward, derivative = FUSED[name]
    return RF.elementwise(forward, input, config, derivative)


def _softplus(config, input, beta=1.0, threshold=20.0):
    if not _floating(input) or _parameter(input):
        return F.softplus(input, beta, threshold)
    return RF.elementwise(lambda x: F.softplus(x, beta, threshold), input, config,
                          lambda x: torch.ops.aten.softplus_backward(x.new_ones(()).expand(x.shape), x, beta,
                                                                     threshold))


def _parameter(t: Tensor) -> bool:
    return isinstance(t if t._base is None else t._base, nn.Parameter)


def _floating(*tensors) -> bool:
    return all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors)


def _product(func, twin, config, input, other, *, out=None):
    # most elementwise products in a model's code scale by a number: they leave at the first test
    if out is not None or not _floating(input, other):
        return func(input, other) if out is None else func(input, other, out=out)
    return twin(input, other, config)


def _mul(func, config, input, other, *, out=None):
    output = _product(func, RF.mul, config, input, other, out=out)
    if out is None:
        record_op(output, func, (input, other), {})
    return output


def _recorded(func, config, *args, **kwargs):
    """``func`` as torch computes it, recorded for rebuilding when it reads a linear layer's output."""
    output = func(*args, **kwargs)
    if "out" not in kwargs:
        record_op(output, func, args, kwargs)
    return output


def _batches(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are batches of matrices as ``bmm`` takes them: 3-d, the same batch size."""
    return a.dim() == b.dim() == 3 and a.shape[0] == b.shape[0]


def _bmm(func, config, input, mat2, *, out=None):
    if out is not None or not _floating(input, mat2) or not _batches(input, mat2):
        return func(input, mat2) if out is None else func(input, mat2, out=out)
    return RF.matmul(input, mat2, config)


def _einsum(config, equation, *operands):
    # torch.einsum(equation, a, b) and torch.einsum(equation, [a, b]); other forms run as they are
    pair = operands[0] if len(operands) == 1 and isinstance(operands[0], (list, tuple)) else operands
    if not isinstance(equation, str) or len(pair) != 2 or not _floating(*pair):
        return torch.einsum(equation, *operands)
    return RF.einsum(equation, *pair, config=config)


def _baddbmm(func, config, input, batch1, batch2, *, beta=1, alpha=1, out=None):
    if out is not None or not _floating(input, batch1, batch2) or not _batches(batch1, batch2):
        kwargs = {} if out is None else {"out": out}
        return func(input, batch1, batch2, beta=beta, alpha=alpha, **kwargs)
    return RF.baddbmm(input, batch1, batch2, beta, alpha, config)


def _softmax(func, log, config, input, dim=None, dtype=None):
    if not isinstance(dim, int) or not _floating(input):
        return func(input, dim, dtype=dtype)
    return (RF.log_softmax if log else RF.softmax)(input, dim, dtype, config)


def _softmax_functional(func, log, config, input, dim=None, _stacklevel=3, dtype=None):
    if not isinstance(dim, int) or not _floating(input):
        return func(input, dim, _stacklevel, dtype)
    return (RF.log_softmax if log else RF.softmax)(input, dim, dtype, config)


def _cross_entropy(config, input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                   reduction="mean", label_smoothing=0.0):
    if size_average is not None or reduce is not None or not _floating(input):  # legacy arguments: torch's
        return F.cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                               label_smoothing)
    return RF.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, config)


# Ops whose output attention can rebuild from a linear layer's input (NOTE [Recomputing a projection]):
# signs, sums, scalings and concatenations, as rotary position embeddings and scaled queries are made of,
# and copies (Whisper's ``q_proj(h).view(...).transpose(1, 2).contiguous()``).
_CHEAP = (torch.neg, torch.Tensor.neg, torch.Tensor.__neg__, torch.add, torch.Tensor.add, torch.Tensor.__add__,
          torch.Tensor.__radd__, torch.sub, torch.Tensor.sub, torch.Tensor.__sub__, torch.Tensor.__rsub__,
          torch.div, torch.Tensor.div, torch.Tensor.__truediv__, torch.cat, torch.concat,
          torch.Tensor.contiguous, torch.clone, torch.Tensor.clone)

#: torch function -> RAD twin taking the config first; the table above.
ROUTED = {
    F.linear: _linear,
    **dict.fromkeys((F.conv1d, F.conv2d, F.conv3d), _conv),
    **dict.fromkeys((F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d), _conv_transpose),
    F.scaled_dot_product_attention: _sdpa,
    F.dropout: _dropout,
    F.relu: _relu,
    F.layer_norm: _layer_norm,
    F.rms_norm: _rms_norm,
    torch.rms_norm: _rms_norm,
    F.batch_norm: _batch_norm,
    F.group_norm: _group_norm,
    F.instance_norm: _instance_norm,
    F.multi_head_attention_forward: _mha,
    F.gelu: functools.partial(_activation, "gelu"),
    F.silu: functools.partial(_activation, "silu"),
    F.mish: functools.partial(_activation, "mish"),
    F.softplus: _softplus,
    **{func: functools.partial(_function, name, func)
       for name, funcs in (("exp", (torch.exp, torch.Tensor.exp)), ("tanh", (torch.tanh, torch.Tensor.tanh, F.tanh)),
                           ("sigmoid", (torch.sigmoid, torch.Tensor.sigmoid, F.sigmoid)))
       for func in funcs},
    **{func: functools.partial(_product, func, RF.matmul)
       for func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)},
    **{func: functools.partial(_bmm, func) for func in (torch.bmm, torch.Tensor.bmm)},
    torch.einsum: _einsum,
    **{func: functools.partial(_baddbmm, func) for func in (torch.baddbmm, torch.Tensor.baddbmm)},
    **{func: functools.partial(_mul, func)
       for func in (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__)},
    **{func: functools.partial(_recorded, func) for func in _CHEAP},
    **{func: functools.partial(_softmax, func, log)
       for func, log in ((torch.softmax, False), (torch.Tensor.softmax, False),
                         (torch.log_softmax, True), (torch.Tensor.log_softmax, True))},
    F.softmax: functools.partial(_softmax_functional, F.softmax, False),
    F.log_softmax: functools.partial(_softmax_functional, F.log_softmax, True),
    F.cross_entropy: _cross_entropy,
}


class Route(TorchFunctionMode):
    """Send the functional calls of :data:`ROUTED` to their RAD twins with ``config``."""

    def __init__(self, config: SketchConfig) -> None:
        super().__init__()
        self.config = config

    def __torch_function__(self, func, types, args=(), kwargs=None):
        twin = ROUTED.get(func)
        if twin is None or not torch.is_grad_enabled() or routing_paused():
            return func(*args, **(kwargs or {}))
        return twin(self.config, *args, **(kwargs or {}))


def install(model: nn.Module, config: SketchConfig, entries: Iterable[nn.Module] = ()) -> None:
    """Route ``model``'s functional calls while it trains; a second call only updates the config.

    Routing starts when the model, or any module of ``entries`` (modules of
    ``model`` whose code may make routed calls), starts a forward pass while
    nothing is routed yet (NOTE [Routing recomputed layers]).
    """
    existing = installed(model)
    if existing is not None:
        existing.config = config
        return
    route = model._radgrad_route = _Installed(config)
    for module in {id(m): m for m in (model, *entries)}.values():
        route.handles += [module.register_forward_pre_hook(route.enter),
                          module.register_forward_hook(route.exit, always_call=True)]


def installed(model: nn.Module) -> _Installed | None:
    """The route :func:`install` put on ``model`` (its ``config`` may be changed), or None."""
    return getattr(model, "_radgrad_route", None)


def _pause(module: nn.Module, args) -> None:
    _base._exact_calls[0] += 1


def _resume(module: nn.Module, args, output):
    _base._exact_calls[0] -= 1
    return output


def leave_alone(module: nn.Module, alone: bool = True) -> None:
    """Let ``module``'s calls through to torch unrouted (a module excluded from conversion stays
    torch's), or with ``alone=False`` route them again."""
    handles = module.__dict__.pop("_radgrad_alone", None)
    for handle in handles or ():
        handle.remove()
    if alone:
        module._radgrad_alone = [module.register_forward_pre_hook(_pause),
                                 module.register_forward_hook(_resume, always_call=True)]


def is_left_alone(module: nn.Module) -> bool:
    """Whether :func:`leave_alone` lets ``module``'s own calls through to torch."""
    return "_radgrad_alone" in module.__dict__


# NOTE [Routing recomputed layers]
#   Activation checkpointing (torch.utils.checkpoint, Hugging Face's
#   activation_checkpointing_enable) runs a layer's forward again in the
#   backward pass, long after the model's own forward returned and left its
#   Route. Were only the model's forward routed, the recomputed layer would call
#   torch's functions where the first pass called their RAD twins: it would save
#   other tensors, which non-reentrant checkpointing refuses ("A different
#   number of tensors was saved"). So every module whose code may make routed
#   calls enters the Route when its forward starts while nothing is routed:
#   inside the model's forward that costs a check per module; in a recomputation
#   the outermost recomputed module routes it. With torch's default
#   ``preserve_rng_state`` a non-reentrant recomputation then draws the very
#   numbers of the first pass (reentrant checkpointing is refused:
#   NOTE [Draws in recomputed layers] in radgrad.rng). The state is the model's,
#   not a thread's: one model run by threads at once (nn.DataParallel) is not
#   supported.
class _Installed:
    def __init__(self, config: SketchConfig) -> None:
        self.config = config
        self.handles: list = []
        self.active: list[Route | None] = []
        self.entered = 0

    def enter(self, module: nn.Module, args) -> None:
        mode = None
        if not self.entered and module.training and torch.is_grad_enabled():
            mode = Route(self.config)
            mode.__enter__()
            self.entered += 1
        self.active.append(mode)

    def exit(self, module: nn.Module, *_) -> None:
        # (args, output) unnamed: dynamo compiles this hook as a frame of its own and,
        # given a named non-leaf output, reads its .grad while inspecting the locals,
        # whose UserWarning fails the compilation where warnings are errors
        mode = self.active.pop()
        if mode is not None:
            mode.__exit__(None, None, None)
            self.entered -= 1
