"""How a training step computes its gradient: in one pass, accumulated over micro-batches, or checkpointed.

These are what a user short of memory would otherwise reach for, run on the
same minibatch as every other method so the comparison is like for like:

* ``accumulate``: the minibatch is cut into micro-batches whose saved memory
  fits the budget; their gradients, weighted by size, add up to the exact
  minibatch gradient (up to float rounding) at the memory of one micro-batch.
* ``checkpoint``: ``torch.utils.checkpoint.checkpoint_sequential`` keeps only
  the inputs of a few segments and recomputes each segment's activations in
  the backward pass: the exact gradient for about one extra forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint_sequential

import radgrad

__all__ = ["Stepper", "saved_bytes"]


def saved_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes ``model`` saves for backward on a training-mode pass over ``x`` (:mod:`radgrad.memory`).

    Draws made here do not move torch's default CPU generator; the model's mode is restored.
    """
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[]):
            return radgrad.memory.saved_bytes(model, x)
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class Stepper:
    """One training step's forward and backward pass.

    Attributes:
        micro: accumulate over micro-batches of this many examples (None: one pass).
        segments: checkpoint an ``nn.Sequential`` model in this many segments (None: no checkpointing).
        loss: the loss of a batch, ``loss(output, y)``, a mean over examples (default: cross-entropy).
    """

    micro: int | None = None
    segments: int | None = None
    loss: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy

    def backward(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Add the gradient of the mean loss over ``(x, y)`` to ``.grad``; return the loss (detached)."""
        if self.micro is None or self.micro >= len(y):
            loss = self.loss(self._forward(model, x), y)
            loss.backward()
            return loss.detach()
        total = x.new_zeros(())
        for lo in range(0, len(y), self.micro):
            part = self.loss(self._forward(model, x[lo:lo + self.micro]), y[lo:lo + self.micro])
            part = part * (len(y[lo:lo + self.micro]) / len(y))
            part.backward()
            total += part.detach()
        return total

    def peak(self, model: nn.Module, x: Tensor, y: Tensor) -> int:
        """The most bytes one pass over ``(x, y)`` holds on top of the weights (:func:`radgrad.memory.peak`).

        Activations, what is saved for backward, gradients and temporaries,
        from zeroed gradients; the optimizer's step is left out. With
        accumulation every micro-batch after the first holds the gradients so
        far plus one micro-batch's pass, so that is what is measured. Draws
        made here do not move torch's default CPU generator.
        """
        was_training = model.training
        model.train()
        one_pass = Stepper(segments=self.segments, loss=self.loss)
        micro = self.micro if self.micro is not None and self.micro < len(y) else None

        def step() -> None:
            if micro is None:
                model.zero_grad(set_to_none=True)
                one_pass.backward(model, x, y)
            else:
                one_pass.backward(model, x[:micro], y[:micro])

        try:
            with torch.random.fork_rng(devices=[]):
                model.zero_grad(set_to_none=True)
                if micro is not None:
                    one_pass.backward(model, x[:micro], y[:micro])  # the gradients of a first micro-batch
                record = radgrad.memory.peak(step, model)
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
        return record.peak - sum(p.numel() * p.element_size() for p in model.parameters())

    def _forward(self, model: nn.Module, x: Tensor) -> Tensor:
        if self.segments is None:
            return model(x)
        if not isinstance(model, nn.Sequential):
            raise ValueError(f"radgrad: checkpointing cuts an nn.Sequential model into segments; "
                             f"got {type(model).__name__}")
        return checkpoint_sequential(model, self.segments, x, use_reentrant=False)
