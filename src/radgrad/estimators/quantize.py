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
    independent rounding. Their grid has a row per scale group, the group's
    rows side by side: ``groups + group * n`` numbers drawn, not ``rows + n``
    (a ResNet's 1x1 maps, 8192 rows of one entry: 288 instead of 8193). Two
    entries of one group read different columns, two of different groups
    different rows, so any two are still independent. They are multiples of
    ``2**-23`` (``2**-52`` for float64 tensors): the rounding probability is
    exact up to that grain, which is the compute dtype's own rounding of
    ``f + u`` once ``f >= 1``.

NOTE [Code packing]
    ``8 / bits`` codes share a byte, in planes: a row's ``n`` codes (padded
    to ``w * 8 / bits`` for ``w = ceil(n * bits / 8)`` bytes) are cut into
    ``8 / bits`` consecutive planes of ``w`` codes, and byte ``j`` holds code
    ``j`` of plane ``i`` in its bits ``bits * i ..``, plane 0 in the low bits.
    Both directions are then whole-plane operations with one shift per plane:
    packing ORs the shifted planes together (eagerly it adds them, scaled by
    ``2**(bits * i)``: the same bytes, as the planes' bits do not overlap,
    and twice as fast in torch's CPU kernels), unpacking shifts and masks
    every byte once per plane. Interleaving the codes instead (codes
    ``8 j / bits ..`` in byte ``j``) would need a different shift for
    neighbouring codes, an operation with an innermost dimension of
    ``8 / bits`` that torch's CPU kernels do not vectorize (about ten times
    slower, measured).

NOTE [Packing under compilation]
    Under ``torch.compile`` the codes of each plane are rounded from the
    entries they stand for and shifted into the bytes in one elementwise
    expression over the packed ``(rows, w)`` bytes: inductor fuses rounding
    and packing into one loop. Rounded whole and then cut into planes, the
    codes went through an int32 buffer that inductor laid out in the input's
    order, and the packing loop read it across that order in scalar code
    (compiled step over plain, in one process on an AVX2 CPU: ResNet 1.34 ->
    1.29, ViT 1.29 -> 1.23, BERT 1.14 -> 1.07, MLP with LayerNorm 1.16 ->
    1.05). Eagerly the per-plane form would cost more calls for the same
    passes, so the eager path rounds once and packs. Both store the same bytes.

NOTE [Code width under compilation]
    Eagerly, codes are formed as int16 and unpacked as uint8: torch's kernels
    then move half or a quarter of the bytes int32 would. Inductor's CPU code
    generator (torch 2.13) vectorizes neither int16 nor uint8 shifts and
    conversions and emits scalar loops for them: on a 1024 x 256 2-bit
    tensor, compiled quantization took 196 us with int16 codes and 49 us with
    int32 ones, unpacking 58 us with uint8 and 31 us with int32 (one thread,
    medians of 200 calls; eagerly int32 is the slower, 250 against 204 us
    and 112 against 74). Under ``torch.compile`` codes are therefore int32
    (compiled step over plain: ResNet 1.46 -> 1.34, ViT 1.22 -> 1.05). Both
    widths hold the codes exactly: the stored bytes are the same.

NOTE [Traced once per shape]
    A converted model quantizes and rebuilds dozens of tensors, and the
    per-plane forms above are dozens of graph nodes each: traced inline,
    they made a compiled model's graph tens of times larger than plain
    torch's and its compilation 5-28 times slower. Both are therefore
    nested compile regions (``torch.compiler.nested_compile_region``):
    dynamo traces each once per distinct input (shapes, dtypes, bits) and
    every other call reuses that graph, as AOTAutograd and inductor do.
    Measured (BENCHMARKS.md, "Compiling the quantization once per shape"):
    the first compiled step takes 12-50% less time, and the compiled step
    1-2.5% more, as inductor no longer fuses the rounding with the op that
    made the values nor the rebuild with its consumer. Setting torch's
    ``torch._dynamo.config.inline_invoke_subgraph`` trades back: dynamo
    still traces each region once, inductor fuses as before.
    The random draw stays outside the regions: a region is a deterministic
    function of its inputs (NOTE [Draws are saved, never redrawn] in
    :mod:`radgrad.rng`). Python ints enter a region as fresh ints: one read
    from an attribute carries its origin into the region's reuse guards,
    and dynamo cannot re-read every origin (a route's bits, an attribute of
    a torch-function mode entered before the compiled frame, stopped the
    compilation of HF GPT-2).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from radgrad import rng
from radgrad.sizes import known, row_blocks

__all__ = ["BITS", "GROUP_ENTRIES", "quantize", "dequantize", "packed_width", "plane_width", "group_rows"]

#: The supported code widths.
BITS = (1, 2, 4, 8)

#: Rows shorter than this share one scale with their neighbours, up to this many entries per scale.
GROUP_ENTRIES = 256
# Entries rounded at once: a few float temporaries of this size live while a tensor is quantized.
_BLOCK = 2**18


def _traced_once(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``fn`` as a nested compile region, its int arguments passed as fresh ints (NOTE [Traced once
    per shape]); eagerly, ``fn`` itself."""
    # a model holds many shapes: past the limit dynamo raises rather than tracing anew
    region = torch.compiler.nested_compile_region(fn, max_reuse_entries=100_000)

    @functools.wraps(fn)
    def call(*args):
        return region(*(int(a) if type(a) is int else a for a in args))
    return call


def packed_width(n: int, bits: int) -> int:
    """Bytes per row of ``n`` codes of ``bits`` bits."""
    return -(-n * bits // 8)


def plane_width(n: int, bits: int) -> int | None:
    """Codes per plane when a row of ``n`` codes fills its ``8 / bits`` planes exactly
    (NOTE [Code packing]), else None (and None for 8 bits: one plane)."""
    per = 8 // bits
    return n // per if per > 1 and n % per == 0 else None


def group_rows(n: int) -> int:
    """How many consecutive rows of ``n`` entries share one (lo, step) scale."""
    return max(1, -(-GROUP_ENTRIES // max(n, 1)))


def _group_extremes(values: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """Each group's (min, max), one per group of ``group`` rows (the last group may be short)."""
    # amin and amax: torch.aminmax over rows is some twenty times slower on a CPU
    rows, n = values.shape
    full = rows // group * group
    if known(full == rows):
        grouped = values.reshape(-1, group * n)
        return grouped.amin(-1), grouped.amax(-1)
    if not known(full != rows):
        # a symbolic number of rows (NOTE [Sizes under dynamic shapes]): each row's extremes, the
        # last row's repeated to fill the last group, so every row count takes this one way
        rows_filled = -(-rows // group) * group
        index = torch.arange(rows_filled, device=values.device).clamp_(max=rows - 1)
        return values.amin(-1)[index].view(-1, group).amin(-1), values.amax(-1)[index].view(-1, group).amax(-1)
    grouped = values[:full].reshape(-1, group * n)
    tail = values[full:]
    if not full:
        return tail.amin().view(1), tail.amax().view(1)
    return torch.cat([grouped.amin(-1), tail.amin().view(1)]), torch.cat([grouped.amax(-1), tail.amax().view(1)])


def _group_scales(values: Tensor, group: int, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each group's ``(lo, step, 1 / step)`` for ``bits``-bit codes, in :func:`compute_dtype`; a
    constant group has step 0 and inverse 0."""
    group_lo, group_hi = (t.to(compute_dtype(values.dtype)) for t in _group_extremes(values, group))
    group_step = (group_hi - group_lo).div_(2**bits - 1)
    # A constant row has step 0 and is stored as lo; a non-finite step makes the row NaN on unpacking.
    return group_lo, group_step, torch.where(group_step > 0, group_step.reciprocal(), 0)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 tensors, float32 for the rest (float16 and bfloat16 are rounded in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def quantize(values: Tensor, bits: int, after: Tensor,
             generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """``(codes, scale)``: the ``(rows, n)`` values as packed ``bits``-bit codes and ``(groups, 2)`` (lo, step).

    Rows share a scale in groups of :func:`group_rows` ``(n)``.
    """
    codes, scale = quantize_copies(values, bits, after, generator, 1)
    return codes[0], scale


def quantize_copies(values: Tensor, bits: int, after: Tensor, generator: torch.Generator | None,
                    copies: int) -> tuple[list[Tensor], Tensor]:
    """:func:`quantize` ``copies`` times over, with independent roundings: ``([codes, ...], scale)``.

    Every copy has the same (lo, step) scale; only the uniforms differ, each
    copy's drawn as a grid of its own (NOTE [Pairwise-independent uniforms] in
    :mod:`radgrad.rng`), so the copies are independent. The range, the scale
    and ``(values - lo) / step`` are computed once for all of them.
    """
    rows, n = values.shape
    dtype = compute_dtype(values.dtype)
    group = group_rows(n)
    group_lo, group_step, group_inverse = _group_scales(values, group, bits)
    scale = torch.stack([group_lo, group_step], dim=1)
    grids = rng.draw_grid(-(-rows // group), group * n, after, generator, dtype, copies)
    if torch.compiler.is_compiling() and known(rows % group == 0):
        return [_plane_codes(values, group, group_lo, group_inverse, grid, bits) for grid in grids], scale
    # a block of rows at a time: the float temporaries stay small (NOTE [Unpacking in blocks] in
    # radgrad.functional), whatever the tensor's size
    blocks = row_blocks(rows, max(1, _BLOCK // max(1, n)))
    if len(blocks) == 1 and known(rows % group == 0):
        # one block of whole groups: each group a row of one (lo, step), no per-row copies of them
        return _round(values.reshape(-1, group * n), group_lo.unsqueeze(1), group_inverse.unsqueeze(1),
                      grids, group, n, 0, rows, bits), scale
    lo, inverse = _per_row(group_lo, group, 0, rows), _per_row(group_inverse, group, 0, rows)
    blocked = [_round(values[first:last], lo[first:last], inverse[first:last], grids, group, n, first, last,
                      bits) for first, last in blocks]
    return [torch.cat(copy) if len(copy) > 1 else copy[0] for copy in zip(*blocked)], scale


def _uniforms(grid: Tensor, group: int, n: int, first: int, last: int) -> Tensor:
    """The uniforms of rows ``first .. last`` of ``n`` entries, ``(last - first, n)``, from the grid
    of a row per group of ``group`` rows (NOTE [Stochastic rounding])."""
    groups = grid.shape[0] - group * n
    if group == 1:
        return rng.uniform_rows(grid, groups, first, last)
    start = first // group
    rows = rng.uniform_rows(grid, groups, start, -(-last // group)).view(-1, n)
    return rows[first - start * group:last - start * group]


def _round(values: Tensor, lo: Tensor, inverse: Tensor, grids: list[Tensor], group: int, n: int, first: int,
           last: int, bits: int) -> list[Tensor]:
    """The packed codes of rows ``first .. last`` of ``n`` entries, one tensor per grid of ``grids``
    (:func:`radgrad.rng.draw_grid`, a row per group of ``group`` rows). ``values`` holds those rows,
    or whole groups of them one per row; ``lo`` and ``inverse`` are columns, one per row of ``values``."""
    fractions = _fractions(values, lo, inverse)
    rows = last - first
    last_copy, grouped = len(grids) - 1, values.shape[0] != rows
    codes = (_codes(fractions, _uniforms(grid, group, n, first, last), 2**bits - 1, i == last_copy)
             for i, grid in enumerate(grids))
    return [_pack_codes(c.view(rows, -1) if grouped else c, bits) for c in codes]


@_traced_once
def _plane_codes(values: Tensor, group: int, lo: Tensor, inverse: Tensor, grid: Tensor, bits: int) -> Tensor:
    """The packed codes of :func:`quantize` for whole groups of rows, formed plane by plane (compiled).

    The bytes are those of :func:`_pack_codes` on the codes of :func:`_codes`
    (NOTE [Packing under compilation]).
    """
    rows, n = values.shape
    levels, width, groups = 2**bits - 1, packed_width(n, bits), rows // group
    # each piece below is formed once, not per plane: the traced graph (and its compilation)
    # grows with the number of ops, while inductor fuses the same loops either way
    fractions = _fractions(values.view(-1, group, n), lo.view(-1, 1, 1), inverse.view(-1, 1, 1))
    # the grid's columns as (group, n): a group's rows side by side (NOTE [Stochastic rounding])
    columns, row_parts = grid[groups:].view(group, n), grid[:groups, None, None]
    planes = []
    for first in range(0, n, width):  # the last planes may be padding only: zero codes, not formed
        last = min(n, first + width)
        uniforms = (row_parts + columns[:, first:last]).frac_()
        codes = _codes(fractions[..., first:last], uniforms, levels, last=False)
        planes.append(F.pad(codes, (0, width - (last - first))) if last - first < width else codes)
    packed = planes[0]
    for i, plane in enumerate(planes[1:], 1):
        packed = packed | (plane << (bits * i))
    return packed.reshape(rows, width).to(torch.uint8)


def _code_dtype() -> torch.dtype:
    """The integer type codes are formed and unpacked in (NOTE [Code width under compilation])."""
    return torch.int32 if torch.compiler.is_compiling() else torch.int16


def _fractions(values: Tensor, lo: Tensor, inverse: Tensor) -> Tensor:
    """``(values - lo) * inverse``: each entry's position in steps above its row's ``lo``; ``lo`` and
    ``inverse`` are columns (one per row of ``values``). A new tensor."""
    return (values.to(lo.dtype) - lo).mul_(inverse)


def _codes(fractions: Tensor, uniforms: Tensor, levels: int, last: bool = True) -> Tensor:
    """``floor(fractions + uniforms)`` as integer codes of at most ``levels``. ``uniforms`` holds as
    many entries as ``fractions``; the sum overwrites ``fractions`` when this is its ``last`` use,
    ``uniforms`` otherwise."""
    uniforms = uniforms.view(fractions.shape)
    t = fractions.add_(uniforms) if last else uniforms.add_(fractions)
    # t >= 0 (or NaN in a non-finite group, estimated NaN whatever its codes), so the conversion's
    # truncation is the floor; float32's rounding can reach levels + 1.
    return t.to(_code_dtype()).clamp_(max=levels)


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
    rows, width = codes.shape
    used = -(-n // width)  # planes holding codes: rows of fewer than 8 / bits codes leave some padding only
    if torch.compiler.is_compiling():
        estimate = _scaled_planes(codes, scale, bits, group, lo, used)
        return (estimate if estimate.shape[1] == n else estimate[:, :n]).to(dtype)
    unpacked = _unpack_planes(codes, bits, used).view(rows, -1)  # the n codes and the padding, one byte each
    # the padding cut while still bytes: converted from the strided view, the estimate is made
    # contiguous in the one pass, never held beside a padded float copy (wav2vec2's first group
    # norm, 3199 positions: one map-sized temporary fewer at the step's peak)
    estimate = (unpacked if unpacked.shape[1] == n else unpacked[:, :n]).to(scale.dtype)
    if lo == 0 and known(rows == scale.shape[0] * group):  # whole groups, each one (lo, step)
        # in place rather than addcmul, which is several times slower broadcasting a column
        estimate.view(-1, group, n).mul_(scale[:, 1, None, None]).add_(scale[:, 0, None, None])
    else:
        hi = lo + rows
        estimate.mul_(_per_row(scale[:, 1], group, lo, hi)).add_(_per_row(scale[:, 0], group, lo, hi))
    return estimate.to(dtype)


@_traced_once
def _scaled_planes(codes: Tensor, scale: Tensor, bits: int, group: int, lo: int, used: int) -> Tensor:
    """:func:`dequantize` under compilation, before the padding is cut: ``(rows, used * width)``, the
    first ``used`` planes.

    NOTE [Unpacking under compilation]
        Each plane is shifted by a constant, scaled and placed by a ``cat``:
        inductor's CPU code generator (torch 2.13) vectorizes that, but
        emits scalar code for a shift by a tensor of per-plane amounts
        broadcast over the planes (the eager form, one op for all planes),
        and for scaling the planes stacked in one tensor: rebuilding a
        2080 x 256 tensor from 2-bit codes took 0.88 ms that way and
        0.33 ms this way, against 0.31 ms eagerly (one thread, medians of
        200 calls).
    """
    rows, width = codes.shape
    mask = 2**bits - 1
    if lo == 0 and known(rows == scale.shape[0] * group):  # whole groups, each one (lo, step)
        shape, step, offset = (-1, group, width), scale[:, 1, None, None], scale[:, 0, None, None]
    else:
        shape = (rows, width)
        step, offset = _per_row(scale[:, 1], group, lo, lo + rows), _per_row(scale[:, 0], group, lo, lo + rows)
    data = codes.to(_code_dtype()).view(shape)  # viewed once, not per plane (see _plane_codes)
    planes = [(((data >> (bits * i)) & mask).to(scale.dtype) * step + offset).view(rows, width)
              for i in range(used)]
    return torch.cat(planes, 1) if len(planes) > 1 else planes[0]


def _pack_codes(codes: Tensor, bits: int) -> Tensor:
    """``(rows, n)`` integer codes -> ``(rows, packed_width(n, bits))`` bytes (NOTE [Code packing])."""
    # row-major whatever the layout of the values was (a channels_last input's sketch is not):
    # unpacking views the bytes as rows
    codes = codes.contiguous()
    if bits == 8:
        return codes.to(torch.uint8)
    rows, n = codes.shape
    per, width = 8 // bits, packed_width(n, bits)
    if width * per > n:
        codes = F.pad(codes, (0, width * per - n))
    planes = codes.reshape(rows, per, width)
    packed = planes[:, 0].clone()
    for i in range(1, per):
        packed.add_(planes[:, i], alpha=1 << (bits * i))
    return packed.to(torch.uint8)


def _unpack_planes(data: Tensor, bits: int, used: int | None = None) -> Tensor:
    """The integer codes of :func:`_pack_codes`'s bytes, ``(rows, planes, width)``, padding included:
    all ``8 / bits`` planes, or the first ``used``."""
    if bits == 8:
        return data.unsqueeze(1)
    dtype = torch.uint8 if _code_dtype() == torch.int16 else _code_dtype()
    shifts = torch.arange(0, bits * (used or 8 // bits), bits, dtype=dtype, device=data.device).unsqueeze(1)
    return data.to(dtype).unsqueeze(1).bitwise_right_shift(shifts).bitwise_and_(2**bits - 1)
