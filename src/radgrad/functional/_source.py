"""Tensors an op can rebuild from a linear layer's input instead of saving them.

NOTE [Recomputing a projection]
    Attention keeps its queries and keys exact (NOTE [Attention from a
    sketch of V]). In a transformer both are projections of one hidden
    state ``h``: ``q = h W_q^T + b_q``, ``k = h W_k^T + b_k``, viewed per
    head. Saving ``h`` once and recomputing ``q`` and ``k`` in the backward
    pass stores one tensor where two were stored, at the price of two
    matrix products in the backward pass; the values are those of the
    forward pass (the same ops on the same operands), so nothing becomes
    random.

    :func:`radgrad.functional.linear` records, for the output it returns,
    weak references to its operands (:func:`record`). Cheap ops applied to
    such an output are recorded too (:func:`record_op`, called by
    :mod:`radgrad.route` for ``-``, ``+``, ``*`` by a number or by a tensor
    that needs no gradient, ``torch.cat``, a ``contiguous()`` or ``clone()``
    copy...): a rotary position embedding, ``q * cos + rotate_half(q) *
    sin``, or a scaled query copied per head, ``(q_proj(h) *
    scale).view(...).transpose(1, 2).contiguous()``, is then rebuilt from
    ``h``, the weights and the small ``cos`` and ``sin``. An op is recorded only when every other tensor it reads is
    at most half the size of its output (a broadcast ``cos``, not a
    residual stream: saving that would cost more than the output itself),
    and a recipe replays at most :data:`MAX_STEPS` steps per tensor.

    An op given a tensor asks :func:`source` for a recipe: it exists when
    the tensor is a view of a recorded output (any view: split, ``view``,
    ``transpose``), nothing it was computed from was modified in place
    since, and all of it is still alive. Anything else (a copy made with
    ``copy_``, an op on a tensor that needs a gradient) has no recipe and
    the op saves the tensor itself. Every tensor is held by weak
    reference (a view by its base and its geometry), so recording never
    keeps an activation alive; nothing is recorded while compiling (graphs
    save what their partitioner chooses).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from radgrad.functional._base import _autocast_dtype, _cast, _lives_on

__all__ = ["Recipe", "rebuild", "record", "record_op", "source"]

#: The most steps (linear layers and recorded ops) a recipe may replay for one tensor, beyond those it
#: shares with the tensors before it.
MAX_STEPS = 16

_View = tuple[tuple[int, ...], tuple[int, ...], int]  # size, stride, storage offset


def _root(t: Tensor) -> Tensor:
    return t if t._base is None else t._base


def _geometry(t: Tensor) -> _View:
    return tuple(t.shape), tuple(t.stride()), t.storage_offset()


def _relative(t: Tensor) -> _View:
    """``t``'s geometry, its offset counted from its base's."""
    return tuple(t.shape), tuple(t.stride()), t.storage_offset() - _root(t).storage_offset()


class _Held:
    """A tensor held by a weak reference to its base, its geometry and its base's version; an empty
    one (a key-value cache before its first update) strongly, as it costs nothing."""

    __slots__ = ("ref", "view", "version")

    def __init__(self, t: Tensor) -> None:
        root = _root(t)
        self.ref = weakref.ref(root) if root.numel() else (lambda: root)
        self.view, self.version = _geometry(t), root._version

    def get(self) -> Tensor | None:
        """The tensor, or None when its base is gone or was modified in place."""
        root = self.ref()
        if root is None or root._version != self.version:
            return None
        return root if _geometry(root) == self.view else root.as_strided(*self.view)


class _Linear:
    """A recorded ``F.linear(input, weight, bias)``, cast to ``dtype`` first (autocast)."""

    __slots__ = ("operands", "dtype")

    def __init__(self, input: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype | None) -> None:
        self.operands = tuple(None if t is None else _Held(t) for t in (input, weight, bias))
        self.dtype = dtype


@dataclass(frozen=True)
class _From:
    """An argument of a recorded op that is a view of a recorded node's output."""

    node: _Linear | _Op
    view: _View


class _Op:
    """A recorded ``func(*args, **kwargs)``: arguments are :class:`_From`, :class:`_Held`, lists of
    them (``torch.cat``'s) or constants."""

    __slots__ = ("func", "args", "kwargs")

    def __init__(self, func: Callable, args: tuple, kwargs: dict) -> None:
        self.func, self.args, self.kwargs = func, args, kwargs


_OUTPUTS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # output base -> (node, its version when recorded)


def record(output: Tensor, input: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """Note that ``output`` is ``F.linear(input, weight, bias)`` (under the current autocast state)."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return
    root = _root(output)
    if root.is_contiguous():
        _OUTPUTS[root] = (_Linear(input, weight, bias, _autocast_dtype(input.device.type)), root._version)


def record_op(output: Any, func: Callable, args: Sequence, kwargs: dict) -> None:
    """Note that ``output`` is ``func(*args, **kwargs)``, if it reads a recorded output and every other
    tensor it reads is at most half its size (NOTE [Recomputing a projection])."""
    # an op that returned one of its arguments (``contiguous()`` of a contiguous tensor) made nothing
    if (not isinstance(output, Tensor) or torch.compiler.is_compiling() or not torch.is_grad_enabled()
            or output._base is not None or any(output is a for a in args) or not _reads_recorded(args)):
        return
    limit = output.numel() // 2
    sources: list = []
    try:
        recorded = [_noted(a, limit, sources) for a in args]
        recorded_kwargs = {name: _noted(value, limit, sources) for name, value in kwargs.items()}
    except _NotRecorded:
        return
    if sources:
        _OUTPUTS[output] = (_Op(func, tuple(recorded), recorded_kwargs), output._version)


# Module-level rather than nested: a nested function calling itself is a reference cycle, which
# would keep the tensors it closes over alive until the garbage collector runs.
def _noted(a: Any, limit: int, sources: list) -> Any:
    """How :func:`record_op` keeps argument ``a``; it appends a recorded node ``a`` reads to ``sources``."""
    if isinstance(a, (list, tuple)):
        return [_noted(x, limit, sources) for x in a]
    if not isinstance(a, Tensor):
        return a
    entry = _OUTPUTS.get(_root(a))
    if entry is not None and _root(a)._version == entry[1]:
        sources.append(entry[0])
        return _From(entry[0], _relative(a))
    if a.numel() > limit and not _lives_on(a):
        raise _NotRecorded
    return _Held(a)


class _NotRecorded(Exception):
    pass


def _reads_recorded(args: Sequence) -> bool:
    return any(_reads_recorded(a) if isinstance(a, (list, tuple)) else
               isinstance(a, Tensor) and _root(a) in _OUTPUTS for a in args)


@dataclass
class Recipe:
    """How to rebuild a tensor: :attr:`program` (no tensors: keep it on a ``ctx``) replayed on
    :attr:`tensors` (save these for backward) by :func:`rebuild`."""

    program: tuple
    tensors: tuple[Tensor | None, ...]


def source(*tensors: Tensor) -> Recipe | None:
    """One recipe rebuilding as many of ``tensors`` as it can from linear layers' operands, each
    step computed once (a fused query-key-value projection serves both q and k), or None if it
    rebuilds none of them (NOTE [Recomputing a projection])."""
    if torch.compiler.is_compiling():
        return None
    steps: list = []
    read: list[Tensor | None] = []
    index: dict[int, int] = {}
    outputs: list[tuple[int, _View] | None] = []
    for t in tensors:
        root = _root(t)
        entry = _OUTPUTS.get(root)
        outputs.append(None)
        if entry is None or root._version != entry[1]:
            continue
        kept = len(steps), len(read), dict(index)
        try:
            outputs[-1] = (_compile(entry[0], steps, read, index), _relative(t))
            if len(steps) - kept[0] > MAX_STEPS:
                raise _NotRecorded
        except _NotRecorded:  # drop what this tensor's attempt appended
            del steps[kept[0]:], read[kept[1]:]
            index, outputs[-1] = kept[2], None
    if all(o is None for o in outputs):
        return None
    return Recipe((tuple(steps), tuple(outputs)), tuple(read))


def _compile(node: _Linear | _Op, steps: list, tensors: list, index: dict[int, int]) -> int:
    """Append the steps computing ``node`` (each node once) and the tensors they read; return its step."""
    if id(node) in index:
        return index[id(node)]
    if isinstance(node, _Linear):
        operands = [None if h is None else h.get() for h in node.operands]
        if any(o is None for o, h in zip(operands, node.operands) if h is not None):
            raise _NotRecorded
        tensors.extend(operands)
        step = ("linear", node.dtype)
    else:
        # the steps this op reads first, so that its own tensors follow theirs, as rebuild reads them
        for a in _flat((*node.args, *node.kwargs.values())):
            if isinstance(a, _From):
                _compile(a.node, steps, tensors, index)

        step = ("op", node.func, [_spec(a, tensors, index) for a in node.args],
                {name: _spec(value, tensors, index) for name, value in node.kwargs.items()})
    steps.append(step)
    index[id(node)] = len(steps) - 1
    return len(steps) - 1


def _spec(a: Any, tensors: list, index: dict[int, int]) -> tuple:
    """A recorded op's argument in a program; a tensor it reads is appended to ``tensors``."""
    if isinstance(a, list):
        return ("list", [_spec(x, tensors, index) for x in a])
    if isinstance(a, _From):
        return ("step", index[id(a.node)], a.view)
    if isinstance(a, _Held):
        tensor = a.get()
        if tensor is None:
            raise _NotRecorded
        tensors.append(tensor)
        return ("tensor",)
    return ("value", a)


def _flat(args: Sequence) -> Iterator[Any]:
    for a in args:
        if isinstance(a, list):
            yield from _flat(a)
        else:
            yield a


def rebuild(program: tuple, tensors: Iterator[Tensor | None]) -> list[Tensor | None]:
    """Replay a :class:`Recipe`'s program on its tensors (in order, as :attr:`Recipe.tensors`): the
    tensors given to :func:`source`, None for those it could not rebuild."""
    steps, outputs = program
    values: list[Tensor] = []

    with torch.no_grad():
        for step in steps:
            if step[0] == "linear":
                input, weight, bias = next(tensors), next(tensors), next(tensors)
                if step[1] is not None:
                    input, weight, bias = _cast(step[1], input, weight, bias)
                values.append(F.linear(input, weight, bias))
            else:
                _, func, args, kwargs = step
                values.append(func(*[_value(a, values, tensors) for a in args],
                                   **{k: _value(v, values, tensors) for k, v in kwargs.items()}))
    return [None if o is None else _as(values[o[0]], o[1]) for o in outputs]


def _value(spec: tuple, values: list[Tensor], tensors: Iterator[Tensor | None]) -> Any:
    """The argument ``spec`` (:func:`_spec`) stands for, from the steps' ``values`` and the saved ``tensors``."""
    kind = spec[0]
    if kind == "list":
        return [_value(x, values, tensors) for x in spec[1]]
    if kind == "step":
        return _as(values[spec[1]], spec[2])
    return next(tensors) if kind == "tensor" else spec[1]


def _as(base: Tensor, view: _View) -> Tensor:
    """The view of ``base`` with ``view``'s geometry (:func:`_relative`)."""
    size, stride, offset = view
    if size == tuple(base.shape) and stride == base.stride() and offset == 0:
        return base
    return base.as_strided(size, stride, base.storage_offset() + offset)
