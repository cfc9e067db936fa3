"""Exact 1-bit masks: a bool tensor stored as one bit per entry.

ReLU's backward pass needs only where its output is nonzero; :func:`pack`
keeps that as ``ceil(n / 8)`` bytes and :func:`unpack` rebuilds the bool
tensor with the original shape *and strides* (a channels_last or transposed
mask comes back in its own layout, so nothing is copied into another order).

NOTE [Bit packing by multiplication]
    Eight 0/1 bytes read as one int64 ``v`` (byte i holds bit b_i).
    Multiplying by ``_GATHER`` moves b_i to bit 56 + i without carries, so the
    top byte of ``v * _GATHER`` is ``sum_i b_i 2^i``. Unpacking runs the other
    way: ``p * _COPY`` copies the byte p into all eight bytes, and
    ``& _SPREAD`` keeps bit i in byte i. Plain tensor ops, so it runs on any
    device and traces under ``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Bits", "pack", "unpack"]

_GATHER = 0x0102040810204080
_COPY = 0x0101010101010101
_SPREAD = 0x8040201008040201 - 2**64


class Bits:
    """A packed bool tensor: ``data`` (uint8) plus the shape and memory order to rebuild it."""

    __slots__ = ("data", "shape", "order")

    def __init__(self, data: Tensor, shape: torch.Size, order: tuple[int, ...]) -> None:
        self.data, self.shape, self.order = data, shape, order


def _memory_order(t: Tensor) -> tuple[int, ...] | None:
    """Dimensions from outermost to innermost in memory, if ``t`` is dense in that order."""
    if torch.compiler.is_compiling():
        return None  # the compiler chooses layouts itself (and cannot trace this sort)
    order = tuple(i for _, i in sorted((-stride, i) for i, stride in enumerate(t.stride())))
    return order if t.permute(order).is_contiguous() else None


def pack(mask: Tensor) -> Bits:
    """Pack a bool tensor of any shape and strides into ``ceil(numel / 8)`` bytes."""
    order = _memory_order(mask)
    if order is None:
        mask, order = mask.contiguous(), tuple(range(mask.dim()))
    flat = mask.permute(order).reshape(-1).view(torch.uint8)
    pad = -flat.numel() % 8
    if pad:
        flat = F.pad(flat, (0, pad))
    words = flat.view(torch.int64) * _GATHER
    return Bits((words >> 56).to(torch.uint8), mask.shape, order)


def unpack(bits: Bits) -> Tensor:
    """The bool tensor that :func:`pack` packed, with its shape and memory order."""
    words = (bits.data.long() * _COPY) & _SPREAD  # byte i of each word now holds b_i * 2^i
    permuted = [bits.shape[i] for i in bits.order]
    flat = words.view(torch.uint8)[: bits.shape.numel()].ne(0)
    inverse = sorted(range(len(bits.order)), key=lambda i: bits.order[i])
    return flat.view(permuted).permute(inverse)
