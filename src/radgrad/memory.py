"""The memory ruler: bytes saved for the backward pass, measured, per module.

Every memory figure radgrad reports comes from here. The ruler installs
``torch.autograd.graph.saved_tensors_hooks`` and sees every tensor that
autograd keeps for backward: torch's own ops and radgrad's sketches alike
(radgrad saves them through ``ctx.save_for_backward``).

What counts:
    * each distinct piece of memory once: two ops that save the same tensor,
      or overlapping views of one storage, count their union of bytes;
    * a view by the span of its storage that it covers, not the whole
      storage (a minibatch sliced from a dataset tensor counts as the slice);
    * parameters and buffers of the given model, and any ``nn.Parameter``,
      are excluded: they exist whether or not a backward pass follows.

What does not count: Python values kept on ``ctx`` (radgrad's integer seeds
and shapes, a few bytes per op), the autograd graph's own bookkeeping, and
temporaries freed during the forward pass. Saved-tensor hooks do not nest:
inside ``record`` an outer ``save_on_cpu`` is not applied.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["MemoryRecord", "record", "measure", "saved_bytes"]

OUTSIDE = "(outside modules)"


@dataclass
class MemoryRecord:
    """What :func:`record` saw.

    Attributes:
        total: bytes saved for backward, each distinct byte once.
        by_module: bytes by the qualified name of the innermost module that
            was running when they were first saved (``""`` is the model
            itself, :data:`OUTSIDE` is code outside any module).
        tensors: number of saved tensors seen (including repeats).
    """

    total: int = 0
    by_module: dict[str, int] = field(default_factory=dict)
    tensors: int = 0


class _Ruler:
    def __init__(self, model: nn.Module | None) -> None:
        self.record = MemoryRecord()
        self.excluded: set[int] = set()
        self.stack: list[str] = []
        self.spans: dict[int, list[tuple[int, int]]] = {}
        self.keepalive: list[Tensor] = []
        self.names: dict[int, str] = {}
        if model is not None:
            for tensor in (*model.parameters(), *model.buffers()):
                self.excluded.add(_storage_key(tensor))
            for name, module in model.named_modules():
                self.names.setdefault(id(module), name)

    def pre_hook(self, module: nn.Module, args: Any) -> None:
        self.stack.append(self.names[id(module)])

    def post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.stack.pop()

    def pack(self, tensor: Tensor) -> Tensor:
        self.record.tensors += 1
        if isinstance(tensor, nn.Parameter) or tensor.layout != torch.strided:
            return tensor
        key = _storage_key(tensor)
        if key in self.excluded:
            return tensor
        # Keep the tensor alive so its storage cannot be freed and reused by
        # another tensor while recording, which would count one address twice.
        self.keepalive.append(tensor)
        added = self._add_span(key, _span(tensor))
        if added:
            owner = self.stack[-1] if self.stack else OUTSIDE
            self.record.by_module[owner] = self.record.by_module.get(owner, 0) + added
            self.record.total += added
        return tensor

    def _add_span(self, key: int, span: tuple[int, int]) -> int:
        """Add ``span`` to the storage's covered intervals; return the bytes newly covered."""
        lo, hi = span
        merged: list[tuple[int, int]] = []
        before = 0
        for a, b in self.spans.get(key, []):
            before += b - a
            if b < lo or a > hi:
                merged.append((a, b))
            else:
                lo, hi = min(lo, a), max(hi, b)
        merged.append((lo, hi))
        self.spans[key] = merged
        return sum(b - a for a, b in merged) - before


def _storage_key(tensor: Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _span(tensor: Tensor) -> tuple[int, int]:
    """Byte interval of its storage that a strided tensor covers."""
    size = tensor.element_size()
    start = tensor.storage_offset()
    if tensor.numel() == 0:
        return start * size, start * size
    low = start + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()) if s < 0)
    high = start + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()) if s > 0)
    return low * size, (high + 1) * size


@contextlib.contextmanager
def record(model: nn.Module | None = None) -> Iterator[MemoryRecord]:
    """Record the bytes saved for backward by everything run inside the block.

    Args:
        model: if given, its parameters and buffers are excluded and the
            breakdown names its submodules.

    Yields:
        A :class:`MemoryRecord`, filled in as the block runs.

    Example::

        with radgrad.memory.record(model) as rec:
            loss = model(x).sum()
        print(rec.total, rec.by_module)
    """
    ruler = _Ruler(model)
    handles = []
    if model is not None:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(ruler.pre_hook))
            handles.append(module.register_forward_hook(ruler.post_hook, always_call=True))
    try:
        with torch.autograd.graph.saved_tensors_hooks(ruler.pack, lambda t: t):
            yield ruler.record
    finally:
        for handle in handles:
            handle.remove()
        ruler.keepalive.clear()


def measure(model: nn.Module, *inputs: Any, **kwargs: Any) -> MemoryRecord:
    """Run ``model(*inputs, **kwargs)`` once with gradients on and return what it saved."""
    with torch.enable_grad(), record(model) as rec:
        out = model(*inputs, **kwargs)
        del out
    return rec


def saved_bytes(model: nn.Module, *inputs: Any, **kwargs: Any) -> int:
    """Bytes saved for backward by ``model(*inputs, **kwargs)`` (see :func:`measure`)."""
    return measure(model, *inputs, **kwargs).total
