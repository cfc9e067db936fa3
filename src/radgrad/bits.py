"""Exact 1-bit masks: where a tensor is nonzero, stored as one bit per entry.

ReLU's backward pass needs only where its output is nonzero; :func:`pack`
keeps that as ``ceil(n / 8)`` bytes and :func:`unpack` rebuilds it with the
original shape *and strides* (a channels_last or transposed mask comes back
in its own layout, so nothing is copied into another order), as bytes that
are nonzero exactly where the bit is set: what ``threshold_backward`` reads,
without a pass to turn them into 0/1 (on a CPU, an op writing bools costs
several times one writing bytes).

NOTE [Bit packing by multiplication]
    Eight 0/1 bytes are read as one int64 ``v`` (byte i holds b_i on a
    little-endian machine).
    Multiplying by ``_GATHER`` moves b_i to bit 56 + i without carries, so the
    top byte of ``v * _GATHER`` is ``sum_i b_i 2^i``. Unpacking runs the other
    way: ``p * _COPY`` copies the byte p into all eight bytes, and
    ``& _SPREAD`` keeps bit i in byte i (as ``b_i * 2^i``): two passes over
    memory each way. Under ``torch.compile`` a planar layout is used instead:
    bit i of byte j is entry ``j + i * n / 8``, packed as the float sum of
    eight contiguous 0/1 planes times ``2^i`` and unpacked by int32 shifts:
    measured on a CPU, inductor vectorizes these and fuses them with the ReLU
    around them, while it compiles the multiplication through reinterpreted
    memory, or uint8 shifts, into scalar loops 40-150 times slower.
    ``Bits.planar`` records the layout, so a mask always unpacks the way it
    was packed.
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
    """A packed mask: ``data`` (uint8) plus the shape, memory order and bit layout to rebuild it."""

    __slots__ = ("data", "shape", "order", "planar")

    def __init__(self, data: Tensor, shape: torch.Size, order: tuple[int, ...], planar: bool = False) -> None:
        self.data, self.shape, self.order, self.planar = data, shape, order, planar


def _memory_order(t: Tensor) -> tuple[int, ...] | None:
    """Dimensions from outermost to innermost in memory, if ``t`` is dense in that order."""
    if torch.compiler.is_compiling():
        return None  # the compiler chooses layouts itself (and cannot trace this sort)
    order = tuple(i for _, i in sorted((-stride, i) for i, stride in enumerate(t.stride())))
    return order if t.permute(order).is_contiguous() else None


def _pack_bytes(flat: Tensor) -> Tensor:
    """0/1 bytes, ``numel`` a multiple of 8 -> packed bytes (NOTE [Bit packing by multiplication])."""
    return ((flat.view(torch.int64) * _GATHER) >> 56).to(torch.uint8)


def _unpack_bytes(data: Tensor) -> Tensor:
    """Packed bytes -> 8 bytes each, byte i nonzero where bit i is set."""
    return (data.long() * _COPY).bitwise_and_(_SPREAD).view(torch.uint8)


def pack(t: Tensor) -> Bits:
    """Pack where ``t`` is nonzero (NaN counts as nonzero) into ``ceil(numel / 8)`` bytes.

    ``t`` may have any shape, strides and dtype.
    """
    mask = t.bool()  # != 0, the fast way
    if mask.is_contiguous():
        order, flat = tuple(range(mask.dim())), mask.view(-1)
    else:
        order = _memory_order(mask)
        if order is None:
            mask, order = mask.contiguous(), tuple(range(mask.dim()))
        flat = mask.permute(order).reshape(-1)
    flat = flat.view(torch.uint8)
    pad = -flat.numel() % 8
    if pad:
        flat = F.pad(flat, (0, pad))
    planar = torch.compiler.is_compiling()
    if planar:
        planes = flat.view(8, -1).to(torch.float32)
        data = planes[0]
        for i in range(1, 8):
            data = data + planes[i] * float(2**i)
        data = data.to(torch.uint8)
    else:
        data = _pack_bytes(flat)
    return Bits(data, mask.shape, order, planar)


def unpack(bits: Bits) -> Tensor:
    """A uint8 tensor of the packed shape and memory order, nonzero exactly where the bit is set.

    ``unpack(pack(t)).bool()`` equals ``t != 0``.
    """
    if bits.planar:
        shifts = torch.arange(8, dtype=torch.int32, device=bits.data.device).unsqueeze(1)
        flat = ((bits.data.to(torch.int32) >> shifts) & 1).to(torch.uint8).view(-1)
    else:
        flat = _unpack_bytes(bits.data)
    flat = flat[: bits.shape.numel()]
    inverse = sorted(range(len(bits.order)), key=lambda i: bits.order[i])
    return flat.view([bits.shape[i] for i in bits.order]).permute(inverse)
