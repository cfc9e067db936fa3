"""Saving tensors and sketches for the backward pass of a RAD autograd function.

Every RAD op, built-in or written by a user, saves through
:func:`save_for_backward` and reads back through :func:`saved_tensors`. The
kept values (or codes), the random draw and the scales of each sketch, and the bytes of each bit
mask, go through ``ctx.save_for_backward``, so torch's saved-tensor hooks
(``save_on_cpu``, offloading, :mod:`radgrad.memory`) and ``torch.compile``
see them; shapes and configs stay on ``ctx`` as plain Python values.

Example, an op ``y = x @ w`` that randomizes the ``x`` needed for ``dL/dw``::

    class SketchedMatmul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, config):
            sketch = radgrad.pack(x, config, batch_dims=1)
            radgrad.save_for_backward(ctx, sketch, w)
            return radgrad.tie(x @ w, sketch)  # keeps torch.compile from redrawing

        @staticmethod
        def backward(ctx, grad):
            x_est, w = radgrad.saved_tensors(ctx)  # x_est: unbiased estimate of x
            return grad @ w.t(), x_est.t() @ grad, None

``dL/dw = x^T grad`` is linear in ``x``, so the sketched gradient is unbiased;
``dL/dx = grad w^T`` needs only ``w`` and stays exact. At ``keep=1`` (no ``bits``) the sketch
is ``x`` itself and the op is exact.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from radgrad import bits
from radgrad.sketch import Sketch

__all__ = ["save_for_backward", "saved_tensors"]


def save_for_backward(ctx: Any, *items: Tensor | Sketch | bits.Bits | None) -> None:
    """Save tensors, :class:`~radgrad.sketch.Sketch` and :class:`~radgrad.bits.Bits` objects on ``ctx``.

    Call it once per forward (or ``setup_context``), in place of ``ctx.save_for_backward``.

    Raises:
        TypeError: an item is neither a Tensor, a Sketch, Bits nor None.
    """
    tensors: list[Tensor | None] = []
    layout: list[Any] = []
    for i, item in enumerate(items):
        if isinstance(item, Sketch):
            tensors += [item.values, item.state, item.scale]
            layout.append(Sketch(None, None, None, item.shape, item.dtype, item.batch_dims, item.config))
        elif isinstance(item, bits.Bits):
            tensors.append(item.data)
            layout.append(bits.Bits(None, item.shape, item.order))
        elif item is None or isinstance(item, Tensor):
            tensors.append(item)
            layout.append(None)
        else:
            raise TypeError(
                f"radgrad.save_for_backward: item {i} must be a Tensor, a Sketch, Bits or None, "
                f"got {type(item).__name__}"
            )
    ctx.save_for_backward(*tensors)
    ctx.radgrad_layout = layout


def saved_tensors(ctx: Any, *, unpack: bool = True) -> tuple[Any, ...]:
    """Return what :func:`save_for_backward` saved, in order.

    Tensors come back as saved. With ``unpack=True`` each sketch comes back
    as its unbiased estimate and each mask as :func:`radgrad.bits.unpack`
    gives it (bytes, nonzero where a bit is set); with ``unpack=False`` they
    come back as :class:`~radgrad.sketch.Sketch` and
    :class:`~radgrad.bits.Bits`, whose structure an op may exploit.

    Raises:
        RuntimeError: a randomized sketch is read while building a graph of the
            backward pass (``create_graph=True``): a second derivative through
            a sketch would be silently wrong.
    """
    out: list[Any] = []
    saved = iter(ctx.saved_tensors)
    for meta in ctx.radgrad_layout:
        if meta is None:
            out.append(next(saved))
        elif isinstance(meta, bits.Bits):
            packed = bits.Bits(next(saved), meta.shape, meta.order)
            out.append(bits.unpack(packed) if unpack else packed)
        else:
            sketch = Sketch(next(saved), next(saved), next(saved), meta.shape, meta.dtype, meta.batch_dims,
                            meta.config)
            if not sketch.exact and torch.is_grad_enabled():
                raise RuntimeError(
                    "radgrad: double backward (create_graph=True, which torch.func.grad "
                    "and torch.autograd.grad(create_graph=True) use) through a RAD op is not "
                    "supported: its saved input is a random sketch, so a second derivative "
                    "would be silently wrong. Use keep=1.0 without bits, or exclude this layer from convert()."
                )
            out.append(sketch.unpack() if unpack else sketch)
    return tuple(out)
