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
    memory each way, and both directions read memory alike, so they agree on
    any byte order. That is eager code: a few large torch ops.

NOTE [Masks under torch.compile]
    Traced by ``torch.compile``, masks are packed in *bit planes*: the
    tensor is split into 8 planes of shape ``(m, ...)`` and plane ``k`` goes
    to bit ``k`` of the bytes ``(m, ...)``. Packing and masking the
    gradient are then elementwise over that view, every index affine, so
    inductor fuses them into the loops that compute the activation and
    consume its gradient, as vectorized int32 shifts (uint8 shifts, or an
    index with a remainder, compile to scalar code). Two views:

    * ``PLANES``, for tensors of up to 3 dimensions (a linear layer's
      activations, a transformer's): the entries in logical order, padded to
      ``8 m``. With int32 sampled positions (see
      :func:`radgrad.estimators.sample.draw`), the compiled MNIST MLP step
      fell from 1.16x to 1.07x plain torch's (one thread; 1.27x to 1.13x at
      two).
    * ``BATCH_PLANES``, for feature maps (4 dimensions and more): split along
      the batch dimension, 8 planes of ``m = ceil(n / 8)`` examples.
      Inductor may store a feature map channels_last, which it decides after
      tracing; the batch is the outermost dimension in either layout, so the
      planes read the map in its own order whatever the choice (the
      logical-order planes above cost a transposing pass: the HF ResNet's
      compiled step took 1.42x plain's with them). When ``8 m > n`` the last
      planes are moved back to end at example ``n``, so a few examples are
      stored twice: padded with zero examples instead, every load of
      inductor's loops checked its bounds (a compiled conv-ReLU-conv pass,
      16 x 32 x 32 maps: 1.38x plain's at batch 150, 1.06x at 152, one
      thread). The examples stored twice are at most one byte in nine; a
      batch with more (fewer than 8 examples, say) or a symbolic one is
      packed by the opaque ops ``radgrad::pack_mask`` and
      ``radgrad::masked_grad`` instead, which run the eager functions in
      logical order and so pay for the transposes. Compiled, the paper's
      convnet took 1.23x plain's step with the opaque ops for every map and
      1.06x (one thread) and 1.07x (two) with batch planes, at batch 150.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from radgrad.sizes import known

__all__ = ["Bits", "PLANES", "BATCH_PLANES", "pack", "unpack", "masked_grad"]

_GATHER = 0x0102040810204080
_COPY = 0x0101010101010101
_SPREAD = 0x8040201008040201 - 2**64


PLANES = "planes"
BATCH_PLANES = "batch planes"


class Bits:
    """A packed mask: ``data`` (uint8) plus the shape and the packing to rebuild it.

    ``order`` is the dimensions from outermost to innermost in memory, for a
    mask packed in that order, or :data:`PLANES` / :data:`BATCH_PLANES` for
    one packed in bit planes (NOTE [Masks under torch.compile]).
    """

    __slots__ = ("data", "shape", "order")

    def __init__(self, data: Tensor, shape: torch.Size, order: tuple[int, ...] | str) -> None:
        self.data, self.shape, self.order = data, shape, order


def _memory_order(t: Tensor) -> tuple[int, ...] | None:
    """Dimensions from outermost to innermost in memory, if ``t`` is dense in that order."""
    order = tuple(i for _, i in sorted((-stride, i) for i, stride in enumerate(t.stride())))
    return order if t.permute(order).is_contiguous() else None


# NOTE [Masks in chunks]
#   Packing a mask and masking a gradient with it each make temporaries the
#   size of the tensor: its bools and their int64 products, the unpacked
#   bytes, and inside threshold_backward their cast to the gradient's dtype.
#   They raised the step's peak: on the paper's convnet at batch 150 (maps of
#   4.9M entries), radgrad.memory.peak (which does not see the cast) found
#   53.3 MB of live tensors with whole masks and 43.1 MB with chunks, the
#   exact model 66.2 (benchmarks/bench_mask_chunks.py); the step time did not
#   change beyond the machine's noise. So a mask of more than _CHUNK entries
#   is packed, and a gradient masked, a chunk at a time into one output:
#   chunks of _CHUNK entries (a multiple of 8: whole bytes), or of an eighth
#   of the tensor when that is more, so that a GPU launches a few kernels
#   per chunk for at most 8 chunks.
_CHUNK = 2**20


def _chunk(t: Tensor) -> int | None:
    """Entries per chunk of ``t``'s mask, or None for one call (NOTE [Masks in chunks])."""
    n = t.numel()
    if not known(n > _CHUNK):  # a symbolic size (under compilation the planes above are used)
        return None
    return max(_CHUNK, -(-n // 64) * 8)


def _pad_to_bytes(flat: Tensor) -> Tensor:
    """A flat tensor padded with zeros to a multiple of 8 entries: whole bytes of bits."""
    pad = -flat.numel() % 8
    # padded by a symbolic pad even when it is 0: one way for every size (NOTE [Sizes under dynamic shapes])
    return flat if known(pad == 0) else F.pad(flat, (0, pad))


def _pack_bytes(flat: Tensor) -> Tensor:
    """Flat 0/1 bytes -> packed bytes, padded to whole bytes (NOTE [Bit packing by multiplication])."""
    return ((_pad_to_bytes(flat).view(torch.int64) * _GATHER) >> 56).to(torch.uint8)


def _unpack_bytes(data: Tensor) -> Tensor:
    """Packed bytes -> 8 bytes each, byte i nonzero where bit i is set."""
    return (data.long() * _COPY).bitwise_and_(_SPREAD).view(torch.uint8)


def _as_planes(t: Tensor, kind: str) -> list[Tensor]:
    """The 8 bit planes of ``t``, each ``(m, ...)`` (NOTE [Masks under torch.compile])."""
    if kind == PLANES:
        flat = _pad_to_bytes(t.reshape(-1))
        return list(flat.view(8, flat.shape[0] // 8))  # sizes spelled out: no -1 to infer from no entries
    return [t[lo:lo + m] for lo, m in _batch_plane_starts(t.shape[0])]


def _batch_plane_starts(n: int) -> list[tuple[int, int]]:
    """``(first example, m)`` of each batch plane: ``m = ceil(n / 8)`` examples from ``k m``, the
    last planes moved back to end at ``n`` (overlapping their neighbours) instead of padded."""
    m = -(-n // 8)
    return [(min(k * m, n - m), m) for k in range(8)]


def _from_planes(planes: list[Tensor], kind: str, shape: torch.Size) -> Tensor:
    """The inverse of :func:`_as_planes`."""
    if kind == PLANES:
        joined = torch.cat(planes)
        return (joined if known(joined.numel() == shape.numel()) else joined[: shape.numel()]).view(shape)
    pieces, end = [], 0
    for plane, (lo, m) in zip(planes, _batch_plane_starts(shape[0])):
        pieces.append(plane[end - lo:])  # each example once: from where the previous plane ended
        end = lo + m
    return torch.cat(pieces)


def _batch_planes_fit(t: Tensor) -> bool:
    """Whether ``t``'s batch planes store at most one example in nine twice (NOTE [Masks under torch.compile])."""
    return t.dim() >= 4 and known(-t.shape[0] % 8 <= t.shape[0] // 8)


def _pack_planes(t: Tensor, kind: str) -> Tensor:
    """Where ``t`` is nonzero, packed in bit planes (NOTE [Masks under torch.compile])."""
    planes = _as_planes((t != 0).to(torch.int32), kind)
    data = planes[0]
    for k in range(1, 8):
        data = data | (planes[k] << k)
    return data.to(torch.uint8)


def _unpack_planes(data: Tensor) -> list[Tensor]:
    """Bit planes -> the 8 planes as bools of ``data``'s shape, True where the bit is set."""
    # a constant shift per plane: shifted by a tensor of the 8 amounts, inductor's CPU code was
    # scalar (torch 2.13; NOTE [Unpacking under compilation] in radgrad.estimators.quantize)
    data = data.to(torch.int32)
    return [((data >> k) & 1) != 0 for k in range(8)]


def _pack_mask(t: Tensor) -> Tensor:
    """Where a tensor of any layout and dtype is nonzero, packed in its logical (row-major) order."""
    return _pack_bytes(t.bool().contiguous().view(-1).view(torch.uint8))


def _masked_grad(grad: Tensor, data: Tensor) -> Tensor:
    """ReLU's backward from a mask packed in logical order; ``grad`` of any layout."""
    passes = _unpack_bytes(data)[: grad.numel()].view(grad.shape)
    # written into grad's layout, as the fake promises (TensorIterator alone may
    # follow the contiguous mask instead, for a channels_last grad)
    return torch.ops.aten.threshold_backward.grad_input(grad, passes, 0, grad_input=torch.empty_like(grad))


# ``pack_mask`` takes the tensor itself, not its bool mask: inductor's CPU code
# writing bools ran at about 5 ns an entry (a 65,536-entry mask: 0.37 ms
# compiled, 0.04 ms eager, torch 2.13).
_LIBRARY = torch.library.Library("radgrad", "FRAGMENT")
_LIBRARY.define("pack_mask(Tensor t) -> Tensor")
_LIBRARY.define("masked_grad(Tensor grad, Tensor data) -> Tensor")
_LIBRARY.impl("pack_mask", _pack_mask, "CompositeExplicitAutograd")
_LIBRARY.impl("masked_grad", _masked_grad, "CompositeExplicitAutograd")
torch.library.register_fake("radgrad::pack_mask",
                            lambda t: t.new_empty(-(-t.numel() // 8), dtype=torch.uint8), lib=_LIBRARY)
torch.library.register_fake("radgrad::masked_grad", lambda grad, data: torch.empty_like(grad), lib=_LIBRARY)


def pack(t: Tensor) -> Bits:
    """Pack where ``t`` is nonzero (NaN counts as nonzero) into ``ceil(numel / 8)`` bytes.

    ``t`` may have any shape, strides and dtype. Under ``torch.compile`` a
    feature map's mask may take up to a ninth more (NOTE [Masks under torch.compile]).
    """
    if torch.compiler.is_compiling():
        kind = PLANES if t.dim() <= 3 else BATCH_PLANES if _batch_planes_fit(t) else None
        if kind is not None:
            return Bits(_pack_planes(t, kind), t.shape, kind)
        return Bits(torch.ops.radgrad.pack_mask(t), t.shape, tuple(range(t.dim())))
    order = tuple(range(t.dim())) if t.is_contiguous() else _memory_order(t)
    if order is None:  # not dense: its mask, contiguous
        t, order = t.bool().contiguous(), tuple(range(t.dim()))
    flat = t.permute(order).reshape(-1)
    chunk = _chunk(flat)
    if chunk is None:
        return Bits(_pack_bytes(flat.bool().view(torch.uint8)), t.shape, order)  # .bool(): != 0, the fast way
    data = torch.empty(-(-flat.shape[0] // 8), dtype=torch.uint8, device=t.device)
    for lo in range(0, flat.shape[0], chunk):
        data[lo // 8:(lo + chunk) // 8] = _pack_bytes(flat[lo:lo + chunk].bool().view(torch.uint8))
    return Bits(data, t.shape, order)


def unpack(bits: Bits) -> Tensor:
    """A uint8 tensor of the packed shape and memory order, nonzero exactly where the bit is set.

    ``unpack(pack(t)).bool()`` equals ``t != 0``.
    """
    if isinstance(bits.order, str):
        return _from_planes([kept.to(torch.uint8) for kept in _unpack_planes(bits.data)], bits.order, bits.shape)
    flat = _unpack_bytes(bits.data)[: bits.shape.numel()]
    return flat.view([bits.shape[i] for i in bits.order]).permute(_inverse(bits.order))


def _inverse(order: tuple[int, ...]) -> list[int]:
    return sorted(range(len(order)), key=lambda i: order[i])


def masked_grad(grad: Tensor, bits: Bits) -> Tensor:
    """``grad`` where the packed mask is set, 0 elsewhere (NaN included): ReLU's backward."""
    if isinstance(bits.order, str):
        # masked plane by plane in the planes' view (NOTE [Masks under torch.compile])
        planes = _as_planes(grad, bits.order)
        masked = [torch.where(kept, plane, 0) for kept, plane in zip(_unpack_planes(bits.data), planes)]
        return _from_planes(masked, bits.order, grad.shape)
    if torch.compiler.is_compiling() and bits.order == tuple(range(grad.dim())):
        return torch.ops.radgrad.masked_grad(grad, bits.data)
    in_order = grad.permute(bits.order)
    chunk = _chunk(grad)
    if chunk is None or not in_order.is_contiguous():
        return torch.ops.aten.threshold_backward(grad, unpack(bits), 0)
    out = torch.empty_like(in_order).permute(_inverse(bits.order))
    flat, flat_out, n = in_order.view(-1), out.permute(bits.order).view(-1), grad.numel()
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        passes = _unpack_bytes(bits.data[lo // 8:(hi + 7) // 8])[:hi - lo]
        torch.ops.aten.threshold_backward.grad_input(flat[lo:hi], passes, 0, grad_input=flat_out[lo:hi])
    return out
