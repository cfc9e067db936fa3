"""Random draws for sketches: taken from torch's generators once, in the forward pass.

Every random number radgrad uses comes from :func:`draw`, which reads torch's
default generator of the tensor's device (or a ``generator`` given by the
caller), so ``torch.manual_seed`` makes a run reproducible, eagerly and under
``torch.compile`` alike.

NOTE [Draws are saved, never redrawn]
    A backward pass must read the very numbers its forward pass drew. Under
    ``torch.compile``, AOTAutograd may move a cheap op from the forward graph
    into the backward graph instead of saving its result; done to a random op
    (``torch.randint`` is not on its list of random ops), the backward would
    use *other* numbers than the forward and every estimate would be biased.
    So under compilation the draw runs as the opaque custom op
    ``radgrad::draw``, which the partitioner never recomputes and the graph
    never merges with a twin call (it is tagged ``nondeterministic_seeded``).
    Everything computed *from* a draw (indices, signs) is a deterministic
    function of it and may be recomputed freely. Eagerly the same function
    runs without the custom-op dispatch.

NOTE [Ranks draw independently]
    Under ``torch.distributed`` every rank is usually seeded alike, so the
    same generator state would give every rank the same sample. :func:`draw`
    draws ``world_size`` blocks and keeps the one of its rank: the ranks'
    samples are independent and a run stays reproducible.

NOTE [Counter-based signs]
    The projection estimator needs ``rows x D x k`` random signs, too many to
    store. They are a function of a stored 64-bit seed and the entry number
    ``n``: the sign bit of SplitMix64's output function applied to
    ``seed + (n + 1) * 0x9E3779B97F4A7C15`` (int64 arithmetic wraps, right
    shifts are made logical by masking).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["draw", "draw_seed", "next_prime", "signs"]

_DISTRIBUTED = torch.distributed.is_available()
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64  # constants as signed int64: torch's integer ops wrap
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def _randint(low: int, high: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
             generator: torch.Generator | None) -> Tensor:
    if _DISTRIBUTED and torch.distributed.is_initialized():
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        blocks = torch.randint(low, high, (world, *shape), dtype=dtype, device=device, generator=generator)
        return blocks[rank]
    return torch.randint(low, high, tuple(shape), dtype=dtype, device=device, generator=generator)


@torch.library.custom_op("radgrad::draw", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _draw_op(low: int, high: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    return _randint(low, high, shape, dtype, device, None)


@_draw_op.register_fake
def _(low: int, high: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def draw(low: int, high: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
         generator: torch.Generator | None = None) -> Tensor:
    """Integers uniform on ``[low, high)`` (NOTE [Draws are saved, never redrawn])."""
    if generator is None and torch.compiler.is_compiling():
        return _draw_op(low, high, list(shape), dtype, device)
    return _randint(low, high, shape, dtype, device, generator)


def draw_seed(device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """A 0-dim int64 tensor, uniform over all int64 values but one."""
    return draw(-(2**63), 2**63 - 1, (), torch.int64, device, generator)


@functools.lru_cache(maxsize=256)
def next_prime(n: int) -> int:
    """The smallest prime ``>= n`` (``n >= 1``; 2 for ``n <= 2``)."""
    p = max(2, n)
    while any(p % q == 0 for q in range(2, math.isqrt(p) + 1)):
        p += 1
    return p


def _shr(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def signs(seed: Tensor, start: int, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """Entries ``start ..`` of the sign stream of ``seed`` as +-1 of ``dtype`` (NOTE [Counter-based signs])."""
    n = math.prod(shape)
    z = torch.arange(start + 1, start + n + 1, dtype=torch.int64, device=seed.device)
    z = z * _GOLDEN + seed
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return torch.where(z < 0, -1.0, 1.0).to(dtype).view(tuple(shape))
