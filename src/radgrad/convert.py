"""Model surgery: turn the torch layers of a model into RAD layers, in place."""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from radgrad import route
from radgrad.coverage import coverage, routed_children
from radgrad.nn import CONVERSIONS, Activation, RMSNormLike, TransposedLinear, rms_epsilon, torch_parent
from radgrad.sketch import SketchConfig

__all__ = ["convert"]

_RAD_TYPES = {rad: torch_type for torch_type, rad in CONVERSIONS.items()}
# Modules whose own forward makes no call radgrad.route would reroute: a model made of
# these alone is not routed (the route costs a Python call per torch op it sees).
_RAD_MODULES = (*CONVERSIONS.values(), Activation, RMSNormLike, TransposedLinear)
_PLAIN = {nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Flatten, nn.Unflatten, nn.Identity}


def convert(
    model: nn.Module,
    keep: float | None = None,
    method: str = "sample",
    per_example: bool = True,
    bits: int | None = None,
    exclude: Iterable[str | type[nn.Module]] = (),
    softmax_bits: int | None = None,
) -> nn.Module:
    """Make ``model`` store randomized sketches for backward; return it.

    Every ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``, ``nn.RNN``, ``nn.ReLU``,
    ``nn.AvgPool1d/2d/3d``, ``nn.MaxPool1d/2d/3d``, ``nn.LayerNorm``,
    ``nn.RMSNorm`` and ``nn.Dropout`` in ``model`` (the model itself
    included) becomes its :mod:`radgrad.nn` twin, Hugging Face's ``Conv1D`` a
    :class:`radgrad.nn.TransposedLinear`, a model's own RMS normalization
    (a probe checks) a :class:`radgrad.nn.RMSNormLike` and every parameter-free module that
    acts entry by entry (a probe checks) a :class:`radgrad.nn.Activation`,
    *in place*: the
    module objects, their Parameter objects, buffers, hooks and ``state_dict``
    keys stay the same, so a pretrained model stays pretrained and an
    optimizer built before the call stays valid. A subclass of these torch
    types that computes with its parent's code (overriding neither
    ``forward`` nor ``_conv_forward``, as EfficientNet's depthwise
    convolution) becomes a subclass of both its class and the radgrad twin;
    one with its own ``forward`` is left alone, as are the children of
    ``nn.MultiheadAttention``, ``MaxPool1d/2d/3d(return_indices=True)`` and
    LSTMs with ``proj_size``.
    Lazy modules (``nn.LazyLinear``, ``nn.LazyConv2d``, ...) not yet
    materialized become RAD layers on their first forward.

    While the model trains with gradients on, its own calls to
    ``F.scaled_dot_product_attention``, ``F.multi_head_attention_forward``,
    ``F.linear``, ``F.batch_norm``, ``F.group_norm``, ``F.instance_norm``, ``F.layer_norm``, ``F.rms_norm``,
    ``F.dropout``,
    ``F.relu``, ``F.gelu/silu/mish``, ``torch.matmul``/``bmm``/``baddbmm``/``@``, ``torch.mul``/``*``,
    ``softmax``, ``log_softmax`` and ``F.cross_entropy`` (functions or tensor
    methods) go to their RAD twins (:mod:`radgrad.route`), and its ``-``, ``+``, ``/``, ``torch.cat``
    and products by a number are noted, so that attention can rebuild its
    queries and keys from a projection's input (NOTE [Recomputing a
    projection]); the calls of excluded modules, and of radgrad
    layers given their own settings, stay as they are. A model made only
    of radgrad layers and plain containers is not routed at all. Layers
    recomputed by non-reentrant activation checkpointing are routed again
    and draw their first pass's numbers; reentrant checkpointing raises
    (NOTE [Draws in recomputed layers] in :mod:`radgrad.rng`).

    What is exact and what is estimated: the forward pass is exact. Linear
    and convolution layers estimate their weight gradients only; activations,
    layer and RMS norm, attention, products of two activations, softmax and the loss
    estimate gradients that flow
    on to earlier layers, so every gradient upstream of them is an estimate.
    Every estimate is unbiased. In eval mode the model computes exactly what
    it did before.

    Converting twice is harmless; converting a converted model with other
    settings updates them. :func:`radgrad.coverage` reports what was
    converted, what was left exact and why; ``convert`` warns when less than
    half of the trainable parameters are in modules it covers (judged by
    module type: a module of the model's own code counts as covered, since
    its torch calls are routed; ``radgrad.coverage(model, *inputs)``
    measures what it saved).

    Args:
        model: the model to convert.
        keep, method, per_example, bits: see :class:`radgrad.SketchConfig`
            (``keep`` defaults to 0.1, or 1 for ``method="quantize"``).
        exclude: qualified module names (as in ``model.named_modules()``) or
            module types; an excluded module and everything inside it keep
            their current class.
        softmax_bits: the bits of softmax's saved output (see
            :class:`radgrad.SketchConfig`): 4 for ``method="quantize"``
            without ``bits``, else ``bits``.

    Returns:
        ``model``, converted.

    Raises:
        ValueError: a bad ``keep``, ``method``, ``bits`` or ``softmax_bits``, or an ``exclude`` name that is
            not a module of ``model``.
        TypeError: ``model`` is not an ``nn.Module`` or ``exclude`` holds
            something that is neither a name nor a module type.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"radgrad.convert: model must be an nn.Module, got {type(model).__name__}")
    config = SketchConfig(keep, method, per_example, bits, softmax_bits)
    names, types = _split_exclude(model, exclude)
    skipped = {
        id(inner)
        for name, module in model.named_modules(remove_duplicate=False)
        if name in names or isinstance(module, types)
        for inner in module.modules()
    }
    for name, module in model.named_modules(remove_duplicate=False):
        route.leave_alone(module, name in names or isinstance(module, types))
    inside_attention = routed_children(model)  # nn.MultiheadAttention never calls its children
    for module in model.modules():
        if id(module) not in skipped and id(module) not in inside_attention:
            _convert_one(module, config)
    # modules whose own code may call what the route reroutes (NOTE [Routing recomputed layers])
    entries = [m for m in model.modules() if id(m) not in skipped
               and not (isinstance(m, _RAD_MODULES) or type(m) in _PLAIN)]
    if entries:
        route.install(model, config, entries)
    report = coverage(model)
    if report.parameter_share < 0.5:
        left = ", ".join(f"{name or '(model)'} ({why.split(':')[0]})"
                         for name, why in list(report.exact.items())[:5])
        warnings.warn(f"radgrad.convert: only {report.parameter_share:.0%} of the model's trainable parameters "
                      f"are in modules it covers; left exact: {left}. See radgrad.coverage(model).", stacklevel=2)
    return model


def _split_exclude(model: nn.Module, exclude) -> tuple[set[str], tuple[type, ...]]:
    if isinstance(exclude, (str, type)):
        exclude = (exclude,)
    names: set[str] = set()
    types: list[type] = []
    known = {name for name, _ in model.named_modules(remove_duplicate=False)}
    for item in exclude:
        if isinstance(item, str):
            if item not in known:
                raise ValueError(
                    f"radgrad.convert: exclude names {item!r}, which is not a module of the model; "
                    f"names look like {sorted(known - {''})[:5]}"
                )
            names.add(item)
        elif isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        else:
            raise TypeError(
                f"radgrad.convert: exclude takes module names (str) or nn.Module types, got {item!r}"
            )
    return names, tuple(types)


def _convert_one(module: nn.Module, config: SketchConfig) -> None:
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        # materializing turns a lazy module into its cls_to_become (nn.Linear, ...)
        rad_type = CONVERSIONS.get(_RAD_TYPES.get(module.cls_to_become, module.cls_to_become))
        if rad_type is not None:
            rad_type.for_lazy(module, config)
        return
    if hasattr(module, "_radgrad_mixin"):
        module._radgrad_mixin.from_torch(module, config)
        return
    rad_type = CONVERSIONS.get(_RAD_TYPES.get(type(module), type(module))) or _subclass_conversion(type(module))
    if rad_type is not None:
        if rad_type.convertible(module):
            rad_type.from_torch(module, config)
    elif _is_transposed_linear(module):
        TransposedLinear.from_torch(module, config)
    elif (offset := _rms_weight_offset(module)) is not None:
        RMSNormLike.from_torch(module, config).weight_offset = offset
    elif _is_elementwise(module):
        Activation.from_torch(module, config)


# What a torch type's forward pass calls on itself: a subclass overriding none of these computes as its parent.
_FORWARD_METHODS = ("forward", "_conv_forward")


def _subclass_conversion(cls: type) -> type[nn.Module] | None:
    """The radgrad class for a subclass of a type in :data:`CONVERSIONS` that computes its output
    with that type's own code (overriding neither ``forward`` nor what it calls), else None."""
    torch_type = torch_parent(cls)
    if torch_type is None or any(getattr(cls, name, None) is not getattr(torch_type, name, None)
                                 for name in _FORWARD_METHODS):
        return None
    return CONVERSIONS[torch_type]


def _is_transposed_linear(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D``: ``x @ weight + bias`` with ``weight`` of shape ``(in, out)``."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pytorch_utils, "Conv1D", None)
    return conv1d is not None and type(module) is conv1d


def _rms_weight_offset(module: nn.Module) -> float | None:
    """If ``module`` is a model's own RMS normalization over its last dimension, the offset its
    weight is used with (0, or 1 for Gemma's ``(1 + weight)``); else None.

    It must hold one parameter, a 1-d ``weight``, and an epsilon attribute
    (:func:`radgrad.nn.rms_epsilon`), and a copy of it given a random weight
    must compute ``F.rms_norm`` with ``weight + offset`` and that epsilon on
    a float32 probe (to float32 rounding: its own code runs in the forward
    pass, the formula only serves the backward).
    """
    if any(True for _ in module.children()) or any(True for _ in module.buffers()):
        return None
    parameters = dict(module.named_parameters())
    weight, eps = parameters.get("weight"), rms_epsilon(module)
    if len(parameters) != 1 or weight is None or weight.dim() != 1 or eps is None or weight.is_meta:
        return None
    g = torch.Generator().manual_seed(0)
    d = weight.numel()
    try:
        probe = copy.deepcopy(module).to("cpu", torch.float32)
        with torch.no_grad():
            probe.weight.copy_(torch.rand(d, generator=g) + 0.5)
            x = torch.randn(2, 3, d, generator=g)
            y = probe(x)
    except Exception:  # a module that cannot take this probe is not converted
        return None
    if not (isinstance(y, torch.Tensor) and y.shape == x.shape):
        return None
    for offset in _RMS_WEIGHT_OFFSETS:
        expected = nn.functional.rms_norm(x, (d,), probe.weight.detach() + offset, eps)
        if torch.allclose(y, expected, rtol=1e-5, atol=1e-6):
            return offset
    return None


# Offsets a model's RMS normalization may add to its weight: none, or Gemma's one.
_RMS_WEIGHT_OFFSETS = (0.0, 1.0)


# Parameter-free modules that need no probe: never elementwise, or exact already.
_NOT_ELEMENTWISE = (nn.Identity, nn.modules.dropout._DropoutNd, nn.Flatten, nn.Unflatten)


def _is_elementwise(module: nn.Module) -> bool:
    """Whether ``module`` is a deterministic, parameter-free map acting entry by entry.

    Decided by a probe, so that a model's own activations qualify: the
    module must map a float64 tensor to one of the same shape, twice the
    same, with a diagonal Jacobian.
    """
    if isinstance(module, _NOT_ELEMENTWISE) or any(True for _ in module.children()):
        return False
    if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
        return False
    x = torch.linspace(-3, 3, 24, dtype=torch.float64).view(2, 3, 4)
    try:
        with torch.no_grad():
            y, again = module(x.clone()), module(x.clone())
        if not (isinstance(y, torch.Tensor) and y.shape == x.shape and torch.equal(y, again)):
            return False
        jacobian = torch.autograd.functional.jacobian(lambda t: module(t.clone()), x).reshape(24, 24)
    except Exception:  # a module that cannot take this probe is not converted
        return False
    return bool(torch.equal(jacobian, torch.diag(jacobian.diagonal())))
