"""Exact 1-bit storage of boolean masks (a ReLU's derivative is one bit per entry).

NOTE [Bit packing by multiplication]
    Eight bools are eight bytes, each 0 or 1: read them as one int64 ``v``
    (little-endian, byte i holds bit b_i). Multiplying by ``_GATHER`` moves
    b_i to bit 56 + i without carries, so the top byte of ``v * _GATHER`` is
    ``sum_i b_i 2^i``. Unpacking runs the other way: ``p * 0x0101010101010101``
    copies the byte p into all eight bytes, and ``& _SPREAD`` keeps bit i in
    byte i. Both are a few whole-tensor integer ops, with no per-bit loop.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack_bits", "unpack_bits"]

_GATHER = 0x0102040810204080
_COPY = 0x0101010101010101
_SPREAD = 0x8040201008040201 - 2**64  # as a signed int64


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a bool tensor into a flat uint8 tensor of ``ceil(numel / 8)`` bytes."""
    flat = mask.reshape(-1).view(torch.uint8)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    words = flat.view(torch.int64).mul(_GATHER)
    packed = torch.empty(words.numel(), dtype=torch.uint8, device=mask.device)
    return packed.copy_(words.view(torch.uint8)[7::8])  # the top byte of each word


def unpack_bits(packed: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`pack_bits`: the bool tensor of ``shape``."""
    words = torch.empty(packed.numel(), dtype=torch.int64, device=packed.device).copy_(packed)
    words.mul_(_COPY).bitwise_and_(_SPREAD)
    return words.view(torch.uint8)[: shape.numel()].view(shape).bool()
