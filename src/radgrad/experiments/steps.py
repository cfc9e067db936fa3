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

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint_sequential

__all__ = ["Stepper"]


@dataclass(frozen=True)
class Stepper:
    """One training step's forward and backward pass.

    Attributes:
        micro: accumulate over micro-batches of this many examples (None: one pass).
        segments: checkpoint an ``nn.Sequential`` model in this many segments (None: no checkpointing).
    """

    micro: int | None = None
    segments: int | None = None

    def backward(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Add the gradient of the mean cross-entropy over ``(x, y)`` to ``.grad``; return the loss (detached)."""
        if self.micro is None or self.micro >= len(y):
            loss = nn.functional.cross_entropy(self._forward(model, x), y)
            loss.backward()
            return loss.detach()
        total = x.new_zeros(())
        for lo in range(0, len(y), self.micro):
            part = nn.functional.cross_entropy(self._forward(model, x[lo:lo + self.micro]), y[lo:lo + self.micro])
            part = part * (len(y[lo:lo + self.micro]) / len(y))
            part.backward()
            total += part.detach()
        return total

    def _forward(self, model: nn.Module, x: Tensor) -> Tensor:
        if self.segments is None:
            return model(x)
        if not isinstance(model, nn.Sequential):
            raise ValueError(f"radgrad: checkpointing cuts an nn.Sequential model into segments; "
                             f"got {type(model).__name__}")
        return checkpoint_sequential(model, self.segments, x, use_reentrant=False)
