"""Memory budgets, measured by the ruler (:mod:`radgrad.memory`): every figure comes from here.

Saved memory does not depend on the input's values, only on its shape, so the
measurements run the model on random inputs of the task's shape. They never
disturb the caller's random streams: RAD draws seeds from torch's default
generator, which is saved and restored around each measurement.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import radgrad
from radgrad.allocate import Allocation
from radgrad.experiments import steps
from radgrad.experiments.steps import Stepper
from radgrad.experiments.tasks import EXACT_KEEP, Method, Task, get_method

__all__ = ["example_inputs", "prepare", "saved_bytes", "peak_bytes", "param_bytes", "reduced_batch",
           "checkpoint_segments", "allocate", "BUDGET_METHOD"]

#: The RAD method whose memory sets the reduced batch (project and same-sample keep as many values).
BUDGET_METHOD = "different-sample"


def example_inputs(task: Task, batch: int) -> Tensor:
    """Random inputs in [0, 1) of the task's shape, from a private generator."""
    return torch.rand((batch, *task.input_shape), generator=torch.Generator().manual_seed(0))


def prepare(model: nn.Module, method: Method | str, keep: float) -> nn.Module:
    """Convert ``model`` in place for ``method`` and return it.

    Exact methods become radgrad layers at keep 1 (exact gradients; ReLU stores
    1-bit masks, pooling nothing); RAD methods use their estimator at ``keep``.
    """
    method = get_method(method) if isinstance(method, str) else method
    if method.rad:
        c = method.config(keep)
        return radgrad.convert(model, keep=c.keep, method=c.method, per_example=c.per_example, bits=c.bits)
    return radgrad.convert(model, keep=EXACT_KEEP)


def saved_bytes(model: nn.Module, task: Task, batch: int) -> int:
    """Bytes ``model`` saves for backward on one training step at ``batch`` (measured)."""
    return steps.saved_bytes(model, example_inputs(task, batch))


def peak_bytes(model: nn.Module, task: Task, batch: int, stepper: Stepper = Stepper()) -> int:
    """The most bytes a forward and backward pass at ``batch`` holds on top of the weights
    (:meth:`~radgrad.experiments.steps.Stepper.peak`, on random inputs of the task's shape)."""
    return stepper.peak(model, example_inputs(task, batch), torch.zeros(batch, dtype=torch.long))


def checkpoint_segments(model: nn.Module, task: Task, keep: float, batch: int) -> tuple[int, bool]:
    """``(segments, fits)``: the checkpoint segmentation of ``model`` with the lowest peak, and
    whether that peak is within RAD's (:data:`BUDGET_METHOD` at ``keep``, measured by :func:`peak_bytes`).

    At least two segments: ``checkpoint_sequential`` runs its last segment
    normally, so one segment would checkpoint nothing.

    Raises:
        ValueError: ``model`` is not an ``nn.Sequential``.
    """
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"radgrad: checkpointing cuts an nn.Sequential model into segments; the {task.name} "
                         f"model is a {type(model).__name__}")
    budget = peak_bytes(prepare(copy.deepcopy(model), BUDGET_METHOD, keep), task, batch)
    exact = prepare(copy.deepcopy(model), "baseline", keep)
    peaks = {s: peak_bytes(exact, task, batch, Stepper(segments=s)) for s in range(2, len(model) + 1)}
    best = min(peaks, key=lambda s: (peaks[s], s))
    return best, peaks[best] <= budget


def param_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def reduced_batch(model: nn.Module, task: Task, keep: float, batch: int) -> int:
    """The largest batch whose exact saved memory does not exceed RAD's at ``keep`` and ``batch``.

    RAD's memory is that of :data:`BUDGET_METHOD`. Memory is affine in the
    batch, so two measurements give a guess that is then checked (and moved)
    with the ruler until ``saved(b) <= budget < saved(b + 1)``.

    Args:
        model: a torch model of the task (not modified; copies are converted).
        task: its task (for the input shape).
        keep: RAD's keep fraction.
        batch: RAD's batch.

    Returns:
        The reduced batch, at least 1.
    """
    budget = saved_bytes(prepare(copy.deepcopy(model), BUDGET_METHOD, keep), task, batch)
    exact = prepare(copy.deepcopy(model), "baseline", keep)
    one, two = saved_bytes(exact, task, 1), saved_bytes(exact, task, 2)
    slope = max(1, two - one)
    guess = max(1, (budget - (one - slope)) // slope)
    while guess > 1 and saved_bytes(exact, task, guess) > budget:
        guess -= 1
    while saved_bytes(exact, task, guess + 1) <= budget:
        guess += 1
    return int(guess)


def allocate(model: nn.Module, task: Task, keep: float, x: Tensor, y: Tensor) -> Allocation:
    """Give each layer of the converted ``model`` the setting :func:`radgrad.allocate` chooses
    within the saved bytes of :data:`BUDGET_METHOD` at ``keep``, calibrated on ``(x, y)``.

    The budget is that method's measured saved bytes as a fraction of the
    exact model's, both on ``len(x)`` examples. Torch's random state is left as it was.
    """
    plain = copy.deepcopy(model)
    target = saved_bytes(prepare(copy.deepcopy(plain), BUDGET_METHOD, keep), task, len(x))
    exact = saved_bytes(prepare(plain, "baseline", keep), task, len(x))
    with torch.random.fork_rng(devices=[]):
        choice = radgrad.allocate(model, lambda: F.cross_entropy(model(x), y), min(1.0, target / exact))
    choice.apply(model)
    return choice
