"""Compiled CPU kernels for the hot paths of sampling and ReLU masks, with pure-torch twins.

A RAD step is many small operations, and on a CPU each one pays dispatch and
cache costs that can exceed its arithmetic. ``csrc/kernels.cpp`` fuses the
sampling path (draw the indices, gather, and later regenerate and scatter)
and the ReLU mask path into one pass each. It is compiled with
``torch.utils.cpp_extension`` the first time a kernel is needed (about 30 s,
once; later imports reuse the build) and used for CPU tensors.

Every kernel has a twin here written in torch operations. The twins run for
other devices, when ``RADGRAD_KERNELS=0`` is set, and when the kernels cannot
be built (with one warning); they give the very same bits, which the tests
check, so a result never depends on which path ran.

NOTE [Counter-based indices]
    Entry ``n`` of the index stream of ``seed`` is a function of
    ``(seed, n)`` alone: ``z = mix(seed + (n + 1) * 0x9E3779B97F4A7C15)``
    with SplitMix64's output function ``mix``, then Lemire's multiply-shift
    ``((z >> 32) * d) >> 32``, which is uniform on ``[0, d)`` once the rare
    draws whose low word falls below ``2^32 mod d`` are rejected (those are
    redrawn with ``n + 1 + a * 2^40`` for attempt ``a``). Per-example
    sampling gives row ``r`` the entries ``r * k .. r * k + k - 1``; a shared
    sample uses ``0 .. k - 1``. No index tensor is ever stored: the backward
    pass regenerates the stream from the seed.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

_GOLDEN = 0x9E3779B97F4A7C15 - 2**64  # constants as signed int64: torch's integer ops wrap
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64
_LOW32 = 0xFFFFFFFF

_compiled: bool | None = None  # None until the first kernel call decides


def compiled() -> bool:
    """Whether the compiled CPU kernels are in use (building them on the first call)."""
    global _compiled
    if _compiled is None:
        _compiled = _build()
    return _compiled


def _build() -> bool:
    if os.environ.get("RADGRAD_KERNELS", "1") == "0":
        return False
    try:
        from torch.utils.cpp_extension import load

        source = Path(__file__).parent / "csrc" / "kernels.cpp"
        # -ffp-contract=off: no fused multiply-adds, so each product is rounded
        # on its own, as in torch's separate mul and add (the twins' bits).
        load(name="radgrad_kernels", sources=[str(source)], is_python_module=False,
             extra_cflags=["-O3", "-march=native", "-ffp-contract=off"], verbose=False)
        return True
    except Exception as error:  # no compiler, no ninja, or a failed build
        warnings.warn(f"radgrad: could not build the CPU kernels ({type(error).__name__}: {error}); "
                      "using the pure-torch path, which gives the same results more slowly",
                      RuntimeWarning, stacklevel=3)
        return False


def available(device: torch.device) -> bool:
    """Whether the compiled kernels run for tensors on ``device`` (the CPU, once built)."""
    return device.type == "cpu" and compiled()


def draw_seed(device: torch.device) -> int:
    """A seed in [0, 2^62) from torch's default generator of ``device``."""
    if available(device):
        return torch.ops.radgrad.draw_seed()  # the same number, without a tensor
    return torch.randint(2**62, (1,), device=device).item()


def sample_indices(rows: int, k: int, d: int, per_example: bool, seed: int, device: torch.device) -> Tensor:
    """The sampled indices: ``(rows, k)`` per example, ``(k,)`` shared (NOTE [Counter-based indices])."""
    if available(device):
        return torch.ops.radgrad.sample_indices(rows, k, d, per_example, seed)
    n = rows * k if per_example else k
    counters = torch.arange(n, dtype=torch.int64, device=device)
    idx = _draw(seed, counters, d)
    return idx.view(rows, k) if per_example else idx


def sample_pack(x: Tensor, k: int, per_example: bool, seed: int) -> Tensor:
    """``rows x k`` values of the matrix ``x`` at the sampled indices."""
    if available(x.device):
        return torch.ops.radgrad.sample_pack(x.contiguous(), k, per_example, seed)
    idx = sample_indices(x.shape[0], k, x.shape[1], per_example, seed, x.device)
    return x.gather(1, idx) if per_example else x.index_select(1, idx)


def sample_unpack(values: Tensor, d: int, per_example: bool, seed: int, scale: float) -> Tensor:
    """The ``rows x d`` matrix with ``values * scale`` added at the sampled indices."""
    if available(values.device):
        return torch.ops.radgrad.sample_unpack(values.contiguous(), d, per_example, seed, scale)
    rows, k = values.shape
    idx = sample_indices(rows, k, d, per_example, seed, values.device)
    scaled = values * scale
    return values.new_zeros(rows, d).scatter_add_(1, idx if per_example else idx.expand(rows, k), scaled)


def pack_nonzero(x: Tensor) -> Tensor:
    """``ceil(numel / 8)`` bytes, bit ``i`` of byte ``j`` set where entry ``8 j + i`` is nonzero."""
    if available(x.device):
        return torch.ops.radgrad.pack_nonzero(x.contiguous())
    flat = x.reshape(-1).bool()
    if flat.device.type == "cpu":
        return torch.from_numpy(np.packbits(flat.numpy(), bitorder="little"))
    return _pack_by_multiply(flat.view(torch.uint8))


def unpack_mask(packed: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`pack_nonzero`: a bool tensor of ``shape``."""
    count = shape.numel()
    if packed.device.type == "cpu":
        flat = torch.from_numpy(np.unpackbits(packed.numpy(), count=count, bitorder="little"))
    else:
        flat = _unpack_by_multiply(packed, count)
    return flat.view(torch.bool).view(shape)


def masked_grad(grad: Tensor, packed: Tensor) -> Tensor:
    """``grad`` where the packed bit is set, else 0 (NaN grads included): ReLU's backward."""
    if available(grad.device):
        return torch.ops.radgrad.masked_grad(grad.contiguous(), packed)
    mask = unpack_mask(packed, grad.shape).to(grad.dtype)
    return torch.ops.aten.threshold_backward(grad, mask, 0)


def _shr(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: Tensor) -> Tensor:
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def _draw(seed: int, counters: Tensor, d: int) -> Tensor:
    if not 0 < d < 2**32:
        raise ValueError(f"radgrad: rows of at most 2^32 - 1 entries, got {d}")
    seed = seed - 2**64 if seed >= 2**63 else seed
    threshold = (2**32 - d) % d
    idx = torch.empty_like(counters)
    pending, attempt = torch.arange(counters.numel(), device=counters.device), 0
    while pending.numel():
        n = counters[pending] + 1 + (attempt << 40)
        m = _shr(_mix(n * _GOLDEN + seed), 32) * d
        accepted = (m & _LOW32) >= threshold
        idx[pending[accepted]] = _shr(m[accepted], 32)
        pending, attempt = pending[~accepted], attempt + 1
    return idx


# NOTE [Bit packing by multiplication]
#     For devices without numpy: eight 0/1 bytes read as one int64 ``v``
#     (little-endian, byte i holds bit b_i). Multiplying by ``_GATHER`` moves
#     b_i to bit 56 + i without carries, so the top byte of ``v * _GATHER`` is
#     ``sum_i b_i 2^i``. Unpacking runs the other way: ``p * _COPY`` copies the
#     byte p into all eight bytes, and ``& _SPREAD`` keeps bit i in byte i.
_GATHER = 0x0102040810204080
_COPY = 0x0101010101010101
_SPREAD = 0x8040201008040201 - 2**64


def _pack_by_multiply(flat: Tensor) -> Tensor:
    """Flat 0/1 uint8 tensor -> packed bytes."""
    pad = -flat.numel() % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    words = flat.view(torch.int64).mul(_GATHER)
    packed = torch.empty(words.numel(), dtype=torch.uint8, device=flat.device)
    return packed.copy_(words.view(torch.uint8)[7::8])  # the top byte of each word


def _unpack_by_multiply(packed: Tensor, count: int) -> Tensor:
    """Packed bytes -> flat 0/1 uint8 tensor of ``count`` entries."""
    words = torch.empty(packed.numel(), dtype=torch.int64, device=packed.device).copy_(packed)
    words.mul_(_COPY).bitwise_and_(_SPREAD)  # byte i now holds b_i * 2^i
    return words.view(torch.uint8)[:count].bool().view(torch.uint8)
