"""Stochastic rounding: each row's values stored in ``bits`` bits, unbiased.

NOTE [Stochastic rounding]
    A row's values are mapped onto ``L = 2**bits - 1`` equal steps between
    the row's minimum ``lo`` and maximum ``hi``: ``f = (x - lo) / step`` with
    ``step = (hi - lo) / L``. The stored code is ``floor(f + u)`` for a
    uniform ``u``, which is ``ceil(f)`` with probability ``f - floor(f)`` and
    ``floor(f)`` otherwise, so ``E[code] = f`` and the estimate
    ``lo + code * step`` has expectation ``x``. Its variance per entry is at
    most ``step**2 / 4``. A constant row (``step == 0``) is stored exactly.
    ``lo`` and ``step`` are kept in float32 (float64 for float64 tensors)
    per scale group: one row, or ``ceil(GROUP_ENTRIES / n)`` consecutive
    rows when rows are shorter than ``GROUP_ENTRIES`` (a row of a 4x4
    feature map would otherwise spend 8 bytes of scale on 4 bytes of codes).
    A group holding inf or NaN estimates NaN throughout: never a finite,
    wrong number.

    The ``u`` are pairwise independent (NOTE [Pairwise-independent uniforms] in
    :mod:`radgrad.rng`), which gives the estimate the mean and covariance of
    independent rounding. They are multiples of ``2**-24``, as are
    ``torch.rand``'s float32 numbers: the rounding probability is exact up
    to that grain, which is below float32's own rounding.

NOTE [Code packing]
    ``8 / bits`` codes share a byte, the first in the low bits. Packing reads
    the ``8 / bits`` one-byte codes of an output byte as one integer ``v``
    (little-endian: code i in byte i) and multiplies it by
    ``M = sum_i 2**(8 (n - 1) - (8 - bits) i)``: code i lands at bit
    ``8 (n - 1) + bits * i`` of the product, and every cross term lands
    either above the top byte or, without carries, below it, so the top byte
    of ``v * M`` is the packed byte. (For ``bits = 1`` this is the multiplier
    of :mod:`radgrad.bits`.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from radgrad import rng

__all__ = ["BITS", "GROUP_ENTRIES", "quantize", "dequantize", "packed_width", "group_rows"]

#: The supported code widths.
BITS = (1, 2, 4, 8)

_WORD = {1: torch.int64, 2: torch.int32, 4: torch.int16}
#: Rows shorter than this share one scale with their neighbours, up to this many entries per scale.
GROUP_ENTRIES = 256
# Entries rounded at once: a few float temporaries of this size live while a tensor is quantized.
_BLOCK = 2**18


def packed_width(n: int, bits: int) -> int:
    """Bytes per row of ``n`` codes of ``bits`` bits."""
    return -(-n * bits // 8)


def group_rows(n: int) -> int:
    """How many consecutive rows of ``n`` entries share one (lo, step) scale."""
    return max(1, -(-GROUP_ENTRIES // max(n, 1)))


def _group_extreme(values: Tensor, group: int, largest: bool) -> Tensor:
    """Each group's min (or max), one per group of ``group`` rows (the last group may be short)."""
    rows, n = values.shape
    reduce = torch.amax if largest else torch.amin
    full = rows // group * group
    parts = [reduce(values[:full].reshape(-1, group * n), -1)] if full else []
    if full < rows:
        parts.append(reduce(values[full:]).view(1))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 tensors, float32 for the rest (float16 and bfloat16 are rounded in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def quantize(values: Tensor, bits: int, after: Tensor,
             generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """``(codes, scale)``: the ``(rows, n)`` values as packed ``bits``-bit codes and ``(groups, 2)`` (lo, step).

    Rows share a scale in groups of :func:`group_rows` ``(n)``.
    """
    rows, n = values.shape
    levels = 2**bits - 1
    dtype = compute_dtype(values.dtype)
    group = group_rows(n)
    group_lo = _group_extreme(values, group, False).to(dtype)
    group_step = (_group_extreme(values, group, True).to(dtype) - group_lo).div_(levels)
    lo, step = _per_row(group_lo, group, 0, rows), _per_row(group_step, group, 0, rows)
    # A constant row has step 0 and is stored as lo; a non-finite step makes the row NaN on unpacking.
    inverse = torch.where(step > 0, step.reciprocal(), 0)
    grid = rng.draw_grid(rows, n, after, generator)
    codes = torch.empty(rows, packed_width(n, bits), dtype=torch.uint8, device=values.device)
    # a block of rows at a time: the float temporaries stay small (NOTE [Unpacking in blocks] in
    # radgrad.functional), whatever the tensor's size
    step_rows = max(1, _BLOCK // max(1, n))
    for first in range(0, rows, step_rows):
        last = min(rows, first + step_rows)
        t = rng.uniform_rows(grid, rows, first, last, dtype)
        t.addcmul_(values[first:last].to(dtype) - lo[first:last], inverse[first:last])
        # t >= 0, so the conversion's truncation is the floor
        codes[first:last] = _pack_codes(t.clamp_(0, levels).to(torch.uint8), bits)
    return codes, torch.stack([group_lo, group_step], dim=1)


def _per_row(per_group: Tensor, group: int, lo: int, hi: int) -> Tensor:
    """Rows ``lo .. hi`` of a per-group quantity, as a ``(hi - lo, 1)`` column."""
    if group == 1:
        return per_group[lo:hi].unsqueeze(1)
    first = lo // group
    part = per_group[first:(hi - 1) // group + 1].repeat_interleave(group)
    return part[lo - first * group:hi - first * group].unsqueeze(1)


def dequantize(codes: Tensor, scale: Tensor, bits: int, n: int, dtype: torch.dtype, lo: int = 0) -> Tensor:
    """The ``(rows, n)`` estimate in ``dtype`` of ``codes``, rows ``lo ..`` of what :func:`quantize` returned.

    ``scale`` is the whole per-group scale :func:`quantize` returned.
    """
    group = group_rows(n)
    hi = lo + codes.shape[0]
    row_lo, row_step = _per_row(scale[:, 0], group, lo, hi), _per_row(scale[:, 1], group, lo, hi)
    return torch.addcmul(row_lo, _unpack_codes(codes, bits, n).to(scale.dtype), row_step).to(dtype)


def _pack_codes(codes: Tensor, bits: int) -> Tensor:
    """``(rows, n)`` one-byte codes -> ``(rows, packed_width(n, bits))`` bytes (NOTE [Code packing])."""
    if bits == 8:
        return codes
    per = 8 // bits
    pad = -codes.shape[1] % per
    if pad:
        codes = F.pad(codes, (0, pad))
    top = 8 * (per - 1)
    multiplier = sum(1 << (top - (8 - bits) * i) for i in range(per))
    if multiplier >= 2**63:
        multiplier -= 2**64
    word = codes.contiguous().view(_WORD[bits])
    return (word * multiplier).bitwise_right_shift_(top).to(torch.uint8)


def _unpack_codes(data: Tensor, bits: int, n: int) -> Tensor:
    """The ``(rows, n)`` one-byte codes of :func:`_pack_codes`'s bytes."""
    if bits == 8:
        return data
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=data.device)
    codes = data.unsqueeze(-1).bitwise_right_shift(shifts).bitwise_and_(2**bits - 1)
    return codes.view(data.shape[0], -1)[:, :n]
