"""Saving tensors and sketches for the backward pass of a RAD autograd function.

Every RAD op, built-in or written by a user, saves through
:func:`save_for_backward` and reads back through :func:`saved_tensors`. The
kept values of each sketch go through ``ctx.save_for_backward``, so torch's
saved-tensor hooks (``save_on_cpu``, offloading, :mod:`radgrad.memory`) see
them; the seed and shape stay on ``ctx`` as plain Python values.

Example, an op ``y = x @ w`` that randomizes the ``x`` needed for ``dL/dw``::

    class SketchedMatmul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, config):
            radgrad.save_for_backward(ctx, radgrad.pack(x, config, batch_dims=1), w)
            return x @ w

        @staticmethod
        def backward(ctx, grad):
            x_est, w = radgrad.saved_tensors(ctx)  # x_est: unbiased estimate of x
            return grad @ w.t(), x_est.t() @ grad, None

``dL/dw = x^T grad`` is linear in ``x``, so the sketched gradient is unbiased;
``dL/dx = grad w^T`` needs only ``w`` and stays exact. At ``keep=1`` the sketch
is ``x`` itself and the op is exact.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from radgrad.sketch import Sketch

__all__ = ["save_for_backward", "saved_tensors"]


def save_for_backward(ctx: Any, *items: Tensor | Sketch | None) -> None:
    """Save tensors and :class:`~radgrad.sketch.Sketch` objects on an autograd ``ctx``.

    Call it once per forward, in place of ``ctx.save_for_backward``.

    Raises:
        TypeError: an item is neither a Tensor, a Sketch nor None.
    """
    tensors: list[Tensor | None] = []
    layout: list[Sketch | None] = []
    for i, item in enumerate(items):
        if isinstance(item, Sketch):
            tensors.append(item.values)
            layout.append(item.with_values(None))
        elif item is None or isinstance(item, Tensor):
            tensors.append(item)
            layout.append(None)
        else:
            raise TypeError(
                f"radgrad.save_for_backward: item {i} must be a Tensor, a Sketch or None, "
                f"got {type(item).__name__}"
            )
    ctx.save_for_backward(*tensors)
    ctx.radgrad_layout = layout


def saved_tensors(ctx: Any, *, unpack: bool = True) -> tuple[Any, ...]:
    """Return what :func:`save_for_backward` saved, in order.

    Tensors come back as saved. Each sketch comes back as its unbiased
    estimate (``unpack=True``) or as a :class:`~radgrad.sketch.Sketch` whose
    structure an op may exploit (``unpack=False``).

    Raises:
        RuntimeError: a randomized sketch is read while building a graph of the
            backward pass (``create_graph=True``): a second derivative through
            a sketch would be silently wrong.
    """
    out: list[Any] = []
    for tensor, meta in zip(ctx.saved_tensors, ctx.radgrad_layout):
        if meta is None:
            out.append(tensor)
            continue
        if not meta.config.exact and torch.is_grad_enabled():
            raise RuntimeError(
                "radgrad: double backward (create_graph=True) through a RAD op is not "
                "supported: its saved input is a random sketch, so a second derivative "
                "would be silently wrong. Use keep=1.0 or exclude this layer from convert()."
            )
        sketch = meta.with_values(tensor)
        out.append(sketch.unpack() if unpack else sketch)
    return tuple(out)
