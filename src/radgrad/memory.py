"""The memory ruler: bytes saved for the backward pass, per module, and the peak of a training step.

Every memory figure radgrad reports comes from here. :func:`record` and
:func:`measure` count what autograd saves for backward; :func:`peak` counts
every live tensor byte through a whole step (forward, backward, optimizer),
which is what must fit in a device's memory: checkpointing and compression
can cut the saved bytes without cutting the peak as much.

The saved-bytes ruler installs
``torch.autograd.graph.saved_tensors_hooks`` and sees every tensor that
autograd keeps for backward: torch's own ops and radgrad's sketches alike
(radgrad saves them through ``ctx.save_for_backward``).

What counts:
    * each distinct piece of memory once: two ops that save the same tensor,
      or overlapping views of one storage, count their union of bytes;
    * a view by the span of its storage that it covers, not the whole
      storage (a minibatch sliced from a dataset tensor counts as the slice);
    * parameters and buffers of the given model, and any ``nn.Parameter``
      or view of one (``w.mT``), are excluded: they exist whether or not a backward pass follows.

What does not count: Python values kept on ``ctx`` (radgrad's integer seeds
and shapes, a few bytes per op), the autograd graph's own bookkeeping, and
temporaries freed during the forward pass. Saved-tensor hooks do not nest:
inside ``record`` an outer ``save_on_cpu`` is not applied.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["MemoryRecord", "record", "measure", "saved_bytes", "PeakRecord", "peak"]

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
        self._count(tensor)
        # Returned as it is, an output saved by its own node (exp's, tanh's) would hold that node
        # through its grad_fn: a cycle through C++ that keeps a graph never run backward alive for
        # good, and the parameters it reaches. torch reattaches the grad_fn of an unpacked output.
        return tensor.detach()

    def _count(self, tensor: Tensor) -> None:
        self.record.tensors += 1
        if isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter) \
                or tensor.layout != torch.strided:
            return
        key = _storage_key(tensor)
        if key in self.excluded:
            return
        # Keep the tensor alive so its storage cannot be freed and reused by
        # another tensor while recording, which would count one address twice.
        self.keepalive.append(tensor)
        added = self._add_span(key, _span(tensor))
        if added:
            owner = self.stack[-1] if self.stack else OUTSIDE
            self.record.by_module[owner] = self.record.by_module.get(owner, 0) + added
            self.record.total += added

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
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"radgrad.memory.record: model must be an nn.Module or None, got {type(model).__name__}")
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


@dataclass
class PeakRecord:
    """What :func:`peak` saw.

    Attributes:
        peak: the most tensor bytes live at once during the step.
        at_start: tensor bytes of the tracked modules and optimizers live
            when the step began (parameters, buffers, gradients, optimizer state).
        by_kind: the bytes live at the peak, by kind: ``"parameters"``,
            ``"buffers"``, ``"gradients"``, ``"activations"`` (created in a
            module's forward), ``"temporaries"``, ``"optimizer state"`` and ``"other"``.
    """

    peak: int
    at_start: int
    by_kind: dict[str, int]

    @property
    def added(self) -> int:
        """Bytes the step needs on top of what was live before it: ``peak - at_start``."""
        return self.peak - self.at_start


_KINDS = {"Parameter": "parameters", "Buffer": "buffers", "Gradient": "gradients", "Activation": "activations",
          "Temp": "temporaries", "Optstate": "optimizer state", "Other": "other"}


def peak(step: Callable[[], Any], *owners: nn.Module | torch.optim.Optimizer) -> PeakRecord:
    """Run ``step()`` once and return the peak of live tensor bytes during it.

    Counts, on every device, the tensors of ``owners`` (modules: parameters,
    buffers, gradients; optimizers: their state) and every tensor created
    while ``step`` runs, for as long as it lives. Tensors created before the
    step and owned by none of ``owners`` (the input batch, say) are not
    counted, nor are views of them made during the step. Measured by torch's
    ``MemTracker`` (torch.distributed._tools), which follows tensor storages
    through a dispatch mode: it works on the CPU and needs no allocator
    support, but not inside ``torch.compile``d code, and it does not see the
    temporaries an operator makes inside its own kernel.

    Run one step before measuring: an optimizer such as Adam allocates its
    state on its first step, which a steady-state step does not.

    Example::

        def step():
            loss_fn(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()

        step()  # warm-up: the optimizer's state exists from here on
        print(radgrad.memory.peak(step, model, optimizer).peak)

    Raises:
        TypeError: ``step`` is not callable, or an owner is neither a module nor an optimizer.
        RuntimeError: torch was built without ``torch.distributed`` (MemTracker lives there).
    """
    if not callable(step):
        raise TypeError(f"radgrad.memory.peak: step must be a callable running the step, got {type(step).__name__}")
    for owner in owners:
        if not isinstance(owner, (nn.Module, torch.optim.Optimizer)):
            raise TypeError(f"radgrad.memory.peak: owners must be modules or optimizers, got {type(owner).__name__}")
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError as err:
        raise RuntimeError("radgrad.memory.peak needs a torch built with torch.distributed "
                           f"(its MemTracker measures the peak): {err}") from None

    from torch.distributed._tools.common_utils import get_untyped_storages

    class _Tracker(MemTracker):
        # torch's counts the whole storage of any tensor an op returns that it has not seen, a view of
        # the input batch too (a minibatch sliced from a dataset tensor: the whole dataset). Storages
        # an op reads before the tracker has seen them existed before the step: never counted.
        def __init__(self) -> None:
            super().__init__()
            self._before = WeakIdKeyDictionary()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, Tensor):
                    for st in get_untyped_storages(t):
                        if st not in self._WINFO:
                            self._before[st] = True
            return super().__torch_dispatch__(func, types, args, kwargs)

        def _track(self, reftype, t: Tensor) -> None:
            if not all(st in self._before for st in get_untyped_storages(t)):
                super()._track(reftype, t)

        def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True):
            # torch's hooks the gradient of every parameter a module holds, which raises for a
            # frozen one (fine-tuning, a fixed embedding): a placeholder entry makes it skip those
            _NO_HOOK = RemovableHandle(OrderedDict())
            for param in module.parameters():
                if not param.requires_grad:
                    self._param_to_grad_hook_handles.setdefault(param, (_NO_HOOK, _NO_HOOK))
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

    tracker = _Tracker()
    tracker.track_external(*owners)
    with _multi_grad_hooks_removed_after(), tracker:
        at_start = _total(tracker.get_tracker_snapshot("current"))
        step()
    snapshot = tracker.get_tracker_snapshot("peak")
    by_kind = dict.fromkeys(_KINDS.values(), 0)
    for per_device in snapshot.values():
        for kind, nbytes in per_device.items():
            if kind != "Total":
                by_kind[_KINDS[kind.value]] += nbytes
    return PeakRecord(peak=_total(snapshot), at_start=at_start, by_kind=by_kind)


@contextlib.contextmanager
def _multi_grad_hooks_removed_after() -> Iterator[None]:
    # MemTracker's ModTracker hooks every module's inputs with a multi-grad hook whose closure holds
    # their autograd nodes: a cycle through C++ that Python's gc cannot see, which kept every
    # parameter the step used alive for the life of the process. Removing the hooks breaks it.
    from torch.distributed._tools import mod_tracker

    register = mod_tracker.register_multi_grad_hook
    handles: list[RemovableHandle] = []

    def register_and_keep(*args: Any, **kwargs: Any) -> RemovableHandle:
        handles.append(register(*args, **kwargs))
        return handles[-1]

    mod_tracker.register_multi_grad_hook = register_and_keep
    try:
        yield
    finally:
        mod_tracker.register_multi_grad_hook = register
        for handle in handles:
            handle.remove()


def _total(snapshot: dict) -> int:
    return sum(per_device["Total"] for per_device in snapshot.values())
