"""Budget allocation: per layer, the sketch setting that keeps the summed gradient variance lowest within a byte budget.

NOTE [Allocating a budget]
    A converted linear or convolution layer ``l`` saves ``B_l(c)`` bytes for
    backward under the sketch setting ``c`` and adds ``V_l(c) = E||g_hat - g||^2``
    to its weight gradient. The layers draw independently and their output
    gradients are exact, so the errors of different layers are uncorrelated
    and the variance of the whole gradient is ``sum_l V_l(c_l)``. The
    allocation picks one ``c_l`` per layer to minimise that sum subject to
    ``sum_l B_l(c_l) <= budget``: a multiple-choice knapsack, solved by its
    Lagrangian relaxation (for a price ``p`` per byte each layer takes the
    setting of least ``V + p B``; bisection finds the lowest price whose
    choices fit), then spending what is left of the budget on the upgrades
    that buy the most variance per byte. Every candidate is unbiased, so the
    allocated model is unbiased whatever it picks.

    ``B`` and ``V`` are measured on a calibration batch: ``B`` by the ruler
    (:mod:`radgrad.memory`), ``V`` from ``draws`` fresh sketches of the
    layer's actual input multiplied by its actual output gradient (from one
    exact backward pass). The variances move as the model trains; allocate
    again from time to time, or on a batch taken after some training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from radgrad import memory
from radgrad import nn as rnn
from radgrad.sketch import BITS, SketchConfig

__all__ = ["CANDIDATES", "Allocation", "allocate"]

#: The settings :func:`allocate` chooses from by default: exact, every quantization,
#: uniform and norm-proportional samples, and quantized samples.
CANDIDATES: tuple[SketchConfig, ...] = (
    SketchConfig(1.0),
    *(SketchConfig(method="quantize", bits=b) for b in BITS),
    *(SketchConfig(keep, "sample") for keep in (0.05, 0.1, 0.2, 0.3, 0.5)),
    *(SketchConfig(keep, "norm", bits=1) for keep in (0.05, 0.1, 0.2, 0.3, 0.5)),
    *(SketchConfig(keep, "sample", bits=b) for keep in (0.25, 0.5) for b in (2, 4, 8)),
)

_LAYERS = (rnn.Linear, rnn.Conv1d, rnn.Conv2d, rnn.Conv3d, rnn.ConvTranspose1d, rnn.ConvTranspose2d,
           rnn.ConvTranspose3d)


@dataclass
class Allocation:
    """What :func:`allocate` chose and measured.

    Attributes:
        configs: qualified module name -> the chosen setting.
        saved_bytes: bytes the model saves for backward with the chosen settings
            (measured: the layers' sketches plus what its other modules save; what
            the loss outside the model saves is not counted).
        budget_bytes: the budget, in bytes.
        exact_bytes: bytes the model saves with every layer exact.
        variance: module name -> the chosen setting's measured ``E||g_hat - g||^2``.
        table: module name -> candidate -> ``(bytes, variance)``, every measurement.
    """

    configs: dict[str, SketchConfig]
    saved_bytes: int
    budget_bytes: int
    exact_bytes: int
    variance: dict[str, float]
    table: dict[str, dict[SketchConfig, tuple[int, float]]]

    @property
    def total_variance(self) -> float:
        """The predicted ``E||g_hat - g||^2`` of all the allocated weights together."""
        return sum(self.variance.values())

    def apply(self, model: nn.Module) -> nn.Module:
        """Give each allocated layer of ``model`` its setting; return ``model``."""
        modules = dict(model.named_modules())
        for name, config in self.configs.items():
            modules[name].sketch = config
        return model


def allocate(
    model: nn.Module,
    loss: Callable[[], Tensor],
    budget: float,
    *,
    candidates: Sequence[SketchConfig] = CANDIDATES,
    draws: int = 8,
) -> Allocation:
    """Choose a sketch setting for every converted linear and convolution layer of ``model``.

    Minimises the summed weight-gradient variance of those layers with the
    model's saved bytes within ``budget`` of what it saves exactly (NOTE
    [Allocating a budget]). ``model`` is not changed; call
    :meth:`Allocation.apply` to use the result. Other radgrad layers (ReLU
    masks, pooling, RNNs) keep their settings, and their bytes count against
    the budget.

    Args:
        model: a model converted by :func:`radgrad.convert`.
        loss: computes a calibration loss from ``model`` (a scalar), e.g.
            ``lambda: F.cross_entropy(model(x), y)``.
        budget: the saved bytes allowed, as a fraction of the exact model's, in (0, 1].
        candidates: the settings to choose from.
        draws: sketches per layer and candidate in the variance measurement (at least 2).

    Raises:
        TypeError: ``model`` is not a module, ``loss`` not callable, or a
            candidate not a :class:`SketchConfig`.
        ValueError: ``budget`` outside (0, 1], fewer than 2 ``draws``, no
            candidates, no linear or convolution layer, or a budget below the
            least any choice saves (the message gives that least fraction).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"radgrad.allocate: model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss):
        raise TypeError(f"radgrad.allocate: loss must be a callable computing a loss from the model, "
                        f"got {type(loss).__name__}")
    if not (isinstance(budget, (int, float)) and 0 < budget <= 1):
        raise ValueError(f"radgrad.allocate: budget must be a fraction in (0, 1], got {budget!r}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 2:
        raise ValueError(f"radgrad.allocate: draws must be an int >= 2, got {draws!r}")
    if not candidates:
        raise ValueError("radgrad.allocate: candidates is empty")
    if not all(isinstance(c, SketchConfig) for c in candidates):
        wrong = next(c for c in candidates if not isinstance(c, SketchConfig))
        raise TypeError(f"radgrad.allocate: candidates must be radgrad.SketchConfig objects, got {wrong!r}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _LAYERS)}
    if not layers:
        raise ValueError("radgrad.allocate: the model has no converted linear or convolution layer "
                         "(convert it with radgrad.convert first)")
    was_training, settings = model.training, {name: m.sketch for name, m in layers.items()}
    model.train()
    try:
        for m in layers.values():
            m.sketch = SketchConfig(1.0)
        with memory.record(model) as exact:
            inputs, outputs, value = _capture(layers, loss)
        weights = [m.weight for m in layers.values()]
        grads = torch.autograd.grad(value, [*outputs.values(), *weights])
        out_grads = dict(zip(layers, grads[:len(layers)]))
        exact_grads = dict(zip(layers, grads[len(layers):]))
        table = {name: {c: _measure(m, inputs[name], out_grads[name], exact_grads[name], c, draws)
                        for c in dict.fromkeys(candidates)}
                 for name, m in layers.items()}
        layer_bytes = sum(_saved(m, inputs[name], SketchConfig(1.0)) for name, m in layers.items())
    finally:
        for name, m in layers.items():
            m.sketch = settings[name]
        model.train(was_training)
    exact_bytes = exact.total - exact.by_module.get(memory.OUTSIDE, 0)  # the model's, not the loss's
    fixed = exact_bytes - layer_bytes  # what the other layers save, whatever is chosen
    limit = math.floor(budget * exact_bytes) - fixed
    choice = _knapsack(table, limit)
    if choice is None:
        least = fixed + sum(min(b for b, _ in row.values()) for row in table.values())
        raise ValueError(f"radgrad.allocate: budget {budget:g} is below the least these candidates can "
                         f"save, {least / exact_bytes:.4f} of the exact model's saved bytes")
    return Allocation(
        configs=choice, saved_bytes=fixed + sum(table[n][c][0] for n, c in choice.items()),
        budget_bytes=math.floor(budget * exact_bytes), exact_bytes=exact_bytes,
        variance={n: table[n][c][1] for n, c in choice.items()}, table=table,
    )


def _capture(layers: dict[str, nn.Module], loss: Callable[[], Tensor]) -> tuple[dict, dict, Tensor]:
    """Run ``loss()`` once: each layer's input (detached) and output (in the graph), and the loss."""
    inputs, outputs = {}, {}
    handles = []
    for name, m in layers.items():
        def hook(module, args, output, name=name):
            inputs[name], outputs[name] = args[0].detach(), output
        handles.append(m.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            value = loss()
    finally:
        for h in handles:
            h.remove()
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise ValueError("radgrad.allocate: loss() must return a scalar tensor")
    missing = sorted(set(layers) - set(inputs))
    if missing:
        raise ValueError(f"radgrad.allocate: loss() did not run the layers {missing}")
    return inputs, outputs, value


def _measure(module: nn.Module, x: Tensor, grad_out: Tensor, exact: Tensor, config: SketchConfig,
             draws: int) -> tuple[int, float]:
    """(saved bytes, E||g_hat - g||^2) of ``module``'s weight gradient under ``config``."""
    saved = _saved(module, x, config)
    if config.exact:
        return saved, 0.0
    errors = []
    for _ in range(draws):
        with torch.enable_grad():
            (g,) = torch.autograd.grad(module(x), module.weight, grad_out)
        errors.append(float((g - exact).square().sum()))
    return saved, sum(errors) / draws


def _saved(module: nn.Module, x: Tensor, config: SketchConfig) -> int:
    """Bytes ``module`` saves for backward on ``x`` under ``config`` (which it keeps)."""
    module.sketch = config
    return memory.saved_bytes(module, x)


def _knapsack(table: dict[str, dict[SketchConfig, tuple[int, float]]], limit: int) -> dict[str, SketchConfig] | None:
    """The multiple-choice knapsack of NOTE [Allocating a budget]; None when nothing fits."""
    if sum(min(b for b, _ in row.values()) for row in table.values()) > limit:
        return None

    def choose(price: float) -> dict[str, SketchConfig]:
        return {name: min(row, key=lambda c: (row[c][1] + price * row[c][0], row[c][0]))
                for name, row in table.items()}

    def cost(choice: dict[str, SketchConfig]) -> int:
        return sum(table[n][c][0] for n, c in choice.items())

    low, high = 0.0, 1.0
    while cost(choose(high)) > limit:
        high *= 4
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if cost(choose(mid)) > limit else (low, mid)
    choice = choose(high)
    # spend what is left: the upgrade with the most variance saved per extra byte, while one fits
    while True:
        left = limit - cost(choice)
        best, best_rate = None, 0.0
        for name, row in table.items():
            b0, v0 = row[choice[name]]
            for c, (b, v) in row.items():
                if v < v0 and b - b0 <= left:
                    rate = (v0 - v) / max(1, b - b0)
                    if rate > best_rate:
                        best, best_rate = (name, c), rate
        if best is None:
            break
        choice[best[0]] = best[1]
    # the relaxation is optimal only at its own cost: no uniform setting that fits may do better
    uniform = [{name: c for name in table} for c in next(iter(table.values()))
               if all(c in row for row in table.values())]
    fitting = [u for u in uniform if cost(u) <= limit]
    return min([choice, *fitting], key=lambda ch: sum(table[n][c][1] for n, c in ch.items()))
