"""What :func:`radgrad.convert` covered in a model, and what it left exact and why."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from radgrad import memory, route
from radgrad.nn import CONVERSIONS, _Converted, torch_parent
from radgrad.sketch import SketchConfig

__all__ = ["Coverage", "coverage"]

# Modules whose functional calls radgrad routes while the model trains (radgrad.route).
_ROUTED = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
           nn.MultiheadAttention)
# Modules that save nothing worth compressing: their backward reads indices or nothing.
_NOTHING_TO_COMPRESS = (nn.Embedding, nn.EmbeddingBag)
_EXACT = SketchConfig(keep=1.0)


@dataclass
class Coverage:
    """What :func:`coverage` found; ``print`` it for a summary.

    Attributes:
        converted: qualified name -> what it became (``"radgrad.nn.Linear"``, ...).
        routed: modules whose functional calls are routed while training: batch, group and instance
            norm, multi-head attention, subclasses of the layers radgrad converts that have their own
            forward (Falcon's ``FalconLinear``: its ``@`` is routed), and the model's own modules
            (classes not from torch) with parameters: XLNet's attention, whose ``torch.einsum``
            calls are routed. Without inputs this says where the route acts, not that it
            compressed anything: inputs tell.
        exact: modules with parameters left exact -> why. With inputs given, only those whose own
            code saved bytes for backward with every sketch exact and no fewer as converted: one
            that saves nothing (a learned offset), or whose calls radgrad routed, is not listed; a
            routed module whose own code saved everything exactly is (none of its calls was
            sketched).
        parameter_share: trainable parameters outside the modules listed in ``exact``, over all
            trainable parameters (embeddings, which save only indices, counted apart; a
            parametrized layer's, weight norm's say, are those of its parametrizations).
        saved_bytes: with inputs given, bytes saved for backward as converted and with every
            sketch exact (``{"converted": ..., "exact": ...}``); empty otherwise.
        holders: with inputs given, the modules holding the most converted saved bytes.
    """

    converted: dict[str, str] = field(default_factory=dict)
    routed: list[str] = field(default_factory=list)
    exact: dict[str, str] = field(default_factory=dict)
    parameter_share: float = 0.0
    saved_bytes: dict[str, int] = field(default_factory=dict)
    holders: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"radgrad: {len(self.converted)} modules converted, {len(self.routed)} routed; "
                 f"{self.parameter_share:.0%} of trainable parameters covered"]
        kinds: dict[str, int] = {}
        for kind in self.converted.values():
            kinds[kind] = kinds.get(kind, 0) + 1
        lines += [f"  {kind}: {n}" for kind, n in sorted(kinds.items())]
        if self.routed:
            lines.append(f"  routed: {', '.join(self.routed[:6])}{' ...' if len(self.routed) > 6 else ''}")
        for name, why in self.exact.items():
            lines.append(f"  left exact: {name or '(model)'}: {why}")
        if self.saved_bytes:
            c, e = self.saved_bytes["converted"], self.saved_bytes["exact"]
            lines.append(f"  saved for backward: {c:,} B of {e:,} B exact ({c / max(e, 1):.3f})")
            lines += [f"    {name or '(model)'}: {n:,} B" for name, n in self.holders.items()]
        return "\n".join(lines)


def coverage(model: nn.Module, *inputs: Any, top: int = 5, **kwargs: Any) -> Coverage:
    """Report what :func:`radgrad.convert` covered in ``model``.

    Without inputs it reads the model's modules only. With example inputs
    (passed to ``model`` as ``model(*inputs, **kwargs)``) it also runs one
    forward pass in training mode twice, as converted and with every sketch
    made exact for the pass, and reports the bytes saved for backward and
    the ``top`` modules holding the converted bytes. The model's buffers
    (batch norms' running statistics) and torch's random state are left as
    they were.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"radgrad.coverage: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ValueError(f"radgrad.coverage: top must be a non-negative int, got {top!r}")
    report = Coverage()
    total = 0
    counted: dict[str, int] = {}  # trainable parameters of each module the share counts
    inside_routed = routed_children(model)
    # excluded from conversion: the route lets their calls through to torch
    alone = {id(sub) for m in model.modules() if route.is_left_alone(m) for sub in m.modules()}
    # a parametrized module's parameters (weight norm's magnitude and direction) live in its
    # `parametrizations`, which compute its weight: theirs are the module's own
    parametrizing = {id(sub) for m in model.modules() if parametrize.is_parametrized(m)
                     for sub in m.parametrizations.modules()}
    for name, module in model.named_modules():
        if id(module) in parametrizing:
            continue
        mine = [*module.parameters(recurse=False),
                *(module.parametrizations.parameters() if parametrize.is_parametrized(module) else ())]
        own = sum(p.numel() for p in mine
                  if p.requires_grad and not isinstance(p, nn.parameter.UninitializedParameter))
        if id(module) in inside_routed:
            total += own
            continue
        routed = id(module) not in alone and (isinstance(module, _ROUTED) or (
            own and type(module) not in CONVERSIONS and (torch_parent(type(module)) is not None
                                                          or not _from_torch(type(module)))))
        if isinstance(module, _Converted):
            report.converted[name] = f"radgrad.nn.{_kind(module)}"
        elif routed:
            report.routed.append(name)
        elif own and isinstance(module, _NOTHING_TO_COMPRESS):
            continue
        elif own and id(module) in alone:
            report.exact[name] = f"{type(module).__name__}: excluded from conversion"
        elif own and type(module) in CONVERSIONS:
            report.exact[name] = (f"{type(module).__name__}: its settings are not supported by "
                                  f"radgrad.nn.{CONVERSIONS[type(module)].__name__}")
        elif own:
            report.exact[name] = f"{type(module).__name__}: not a module type radgrad converts"
        total += own
        counted[name] = own
    if inputs or kwargs:
        modes = {m: m.training for m in model.modules()}
        buffers = [(b, b.clone()) for b in model.buffers()]
        model.train()
        # the generators of the model's accelerator (torch's default: CUDA) and the CPU's
        device_type = next((p.device.type for p in model.parameters() if p.device.type not in ("cpu", "meta")),
                           "cuda")
        try:
            with torch.random.fork_rng(device_type=device_type):
                converted = memory.measure(model, *inputs, **kwargs)
                with _all_exact(model):
                    exact = memory.measure(model, *inputs, **kwargs)
        finally:
            for m, training in modes.items():
                m.training = training
            with torch.no_grad():
                for b, before in buffers:
                    b.copy_(before)
        report.saved_bytes = {"converted": converted.total, "exact": exact.total}
        report.holders = dict(sorted(converted.by_module.items(), key=lambda kv: -kv[1])[:top])
        unrouted = {name: f"{type(model.get_submodule(name)).__name__}: its own code saved everything "
                          f"exactly (none of its torch calls is one radgrad sketches)" for name in report.routed}
        report.exact = {name: why for name, why in {**report.exact, **unrouted}.items()
                        if converted.by_module.get(name, 0) >= exact.by_module.get(name, 0) > 0}
        report.routed = [name for name in report.routed if name not in report.exact]
    left = sum(counted.get(name, 0) for name in report.exact)
    report.parameter_share = (total - left) / total if total else 1.0
    return report


def _from_torch(cls: type) -> bool:
    """Whether ``cls`` is one of torch's own modules (whose forward may call C++ that nothing routes)."""
    return cls.__module__ == "torch" or cls.__module__.startswith("torch.")


def routed_children(model: nn.Module) -> set[int]:
    """The ids of modules inside a module whose functional call radgrad routes, such as
    ``nn.MultiheadAttention``'s ``out_proj``: their weights go through that call, never their own forward."""
    return {id(sub) for m in model.modules() if isinstance(m, _ROUTED) for sub in m.modules() if sub is not m}


@contextlib.contextmanager
def _all_exact(model: nn.Module) -> Iterator[None]:
    configs = {m: m.sketch for m in model.modules() if isinstance(getattr(m, "sketch", None), SketchConfig)}
    installed = route.installed(model)
    routed = installed.config if installed is not None else None
    try:
        for m in configs:
            m.sketch = _EXACT
        if installed is not None:
            installed.config = _EXACT
        yield
    finally:
        for m, config in configs.items():
            m.sketch = config
        if installed is not None:
            installed.config = routed


def _kind(module: nn.Module) -> str:
    mixin = getattr(module, "_radgrad_mixin", None)
    return (mixin or type(module)).__name__
