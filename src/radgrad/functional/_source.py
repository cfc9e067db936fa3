"""Outputs of linear layers that an op can rebuild from the layer's input instead of saving them.

NOTE [Recomputing a projection]
    Attention keeps its queries and keys exact (NOTE [Attention from a
    sketch of V]). In a transformer both are projections of one hidden
    state ``h``: ``q = h W_q^T + b_q``, ``k = h W_k^T + b_k``, viewed per
    head. Saving ``h`` once and recomputing ``q`` and ``k`` in the backward
    pass stores one tensor where two were stored, at the price of two
    matrix products in the backward pass; the values are those of the
    forward pass (the same product on the same operands), so nothing
    becomes random.

    :func:`radgrad.functional.linear` records, for the output it returns,
    weak references to its operands (:func:`record`). An op given a tensor
    asks :func:`source` for a recipe: it exists when the tensor is a view of
    such an output (any view: split, ``view``, ``transpose``), neither the
    output nor the operands were modified in place since, and the operands
    are still alive. Anything else (a copy, a rotary embedding, a
    ``contiguous()``) has no recipe and the op saves the tensor itself.
    The input is held by weak reference, and so are the weight and bias
    unless they are leaves (parameters, or views of one such as
    ``weight.t()``), so recording never keeps an activation alive;
    nothing is recorded while compiling (graphs save what their partitioner
    chooses).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from radgrad.functional._base import _autocast_dtype, _cast

__all__ = ["Recipe", "record", "source"]

_OUTPUTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


@dataclass
class Recipe:
    """How to rebuild a view of a linear layer's output: ``F.linear(input, weight, bias)``, cast to
    ``dtype`` first (autocast), then viewed with ``size``, ``stride`` and ``offset``."""

    input: Tensor
    weight: Tensor
    bias: Tensor | None
    dtype: torch.dtype | None
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    def tensors(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """What the recipe needs kept: save these for backward."""
        return self.input, self.weight, self.bias

    def rebuild(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The view, recomputed from the saved ``input``, ``weight`` and ``bias``."""
        if self.dtype is not None:
            input, weight, bias = _cast(self.dtype, input, weight, bias)
        with torch.no_grad():
            out = F.linear(input, weight, bias)
        return out.as_strided(self.size, self.stride, out.storage_offset() + self.offset)


def _root(t: Tensor) -> Tensor:
    return t if t._base is None else t._base


def _hold(t: Tensor | None) -> tuple | None:
    """A reference to ``t``: its root, held strongly, when that is a leaf (a parameter, or a
    view of one such as ``weight.t()``); else a weak reference to ``t`` itself."""
    if t is None:
        return None
    root = _root(t)
    if root.is_leaf:
        return root, (tuple(t.shape), tuple(t.stride()), t.storage_offset())
    return weakref.ref(t), None


def _release(held: tuple | None) -> Tensor | None:
    ref, view = held
    if view is None:
        return ref()
    return ref if ref.shape == view[0] and ref.stride() == view[1] and ref.storage_offset() == view[2] \
        else ref.as_strided(*view)


def record(output: Tensor, input: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """Note that ``output`` is ``F.linear(input, weight, bias)`` (under the current autocast state)."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return
    root = _root(output)
    if not root.is_contiguous():
        return
    dtype = _autocast_dtype(input.device.type)
    # the input weakly, always: a leaf activation (a data batch) is no parameter
    held = ((weakref.ref(input), None), _hold(weight), _hold(bias))
    versions = tuple(None if t is None else t._version for t in (root, input, weight, bias))
    _OUTPUTS[root] = (held, versions, dtype)


def source(t: Tensor) -> Recipe | None:
    """A recipe rebuilding ``t`` from a linear layer's operands, or None (NOTE [Recomputing a projection])."""
    if torch.compiler.is_compiling():
        return None
    root = _root(t)
    entry = _OUTPUTS.get(root)
    if entry is None:
        return None
    held, versions, dtype = entry
    operands = tuple(None if h is None else _release(h) for h in held)
    if any(o is None for o, h in zip(operands, held) if h is not None):
        return None
    if any(v is not None and o._version != v for o, v in zip((root, *operands), versions)):
        return None
    input, weight, bias = operands
    return Recipe(input, weight, bias, dtype, tuple(t.shape), tuple(t.stride()),
                  t.storage_offset() - root.storage_offset())
