"""Model surgery: turn the torch layers of a model into RAD layers, in place."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from radgrad.nn import CONVERSIONS
from radgrad.sketch import SketchConfig

__all__ = ["convert"]

_RAD_TYPES = {rad: torch_type for torch_type, rad in CONVERSIONS.items()}


def convert(
    model: nn.Module,
    keep: float | None = None,
    method: str = "sample",
    per_example: bool = True,
    bits: int | None = None,
    exclude: Iterable[str | type[nn.Module]] = (),
) -> nn.Module:
    """Make ``model`` store randomized sketches for backward; return it.

    Every ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.RNN``, ``nn.ReLU``,
    ``nn.AvgPool1d``, ``nn.AvgPool2d`` and ``nn.MaxPool2d`` in ``model`` (the
    model itself included) becomes its :mod:`radgrad.nn` twin *in place*: the
    module objects, their Parameter objects, buffers, hooks and ``state_dict``
    keys stay the same, so a pretrained model stays pretrained and an
    optimizer built before the call stays valid. Subclasses of these torch
    types (for example the output projection of ``nn.MultiheadAttention``) and
    ``MaxPool2d(return_indices=True)`` and bidirectional RNNs are left alone.
    Lazy modules (``nn.LazyLinear``, ``nn.LazyConv2d``, ...) not yet
    materialized become RAD layers on their first forward.

    What is exact and what is estimated: the forward pass and every gradient
    except those of the converted linear and convolution weights are exact;
    those weight gradients are unbiased estimates. In eval mode the model
    computes exactly what it did before.

    Converting twice is harmless; converting a converted model with other
    settings updates them.

    Args:
        model: the model to convert.
        keep, method, per_example, bits: see :class:`radgrad.SketchConfig`
            (``keep`` defaults to 0.1, or 1 for ``method="quantize"``).
        exclude: qualified module names (as in ``model.named_modules()``) or
            module types; an excluded module and everything inside it keep
            their current class.

    Returns:
        ``model``, converted.

    Raises:
        ValueError: a bad ``keep``, ``method`` or ``bits``, or an ``exclude`` name that is
            not a module of ``model``.
        TypeError: ``model`` is not an ``nn.Module`` or ``exclude`` holds
            something that is neither a name nor a module type.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"radgrad.convert: model must be an nn.Module, got {type(model).__name__}")
    config = SketchConfig(keep, method, per_example, bits)
    names, types = _split_exclude(model, exclude)
    skipped = {
        id(inner)
        for name, module in model.named_modules(remove_duplicate=False)
        if name in names or isinstance(module, types)
        for inner in module.modules()
    }
    for module in model.modules():
        if id(module) not in skipped:
            _convert_one(module, config)
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
    torch_type = _RAD_TYPES.get(type(module), type(module))
    rad_type = CONVERSIONS.get(torch_type)
    if rad_type is None or not rad_type.convertible(module):
        return
    rad_type.from_torch(module, config)
