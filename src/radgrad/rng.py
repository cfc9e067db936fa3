"""Random draws for sketches: taken from torch's generators once, in the forward pass.

Every random number radgrad uses comes from :func:`draw`, which reads torch's
default generator of the tensor's device (or a ``generator`` given by the
caller), so ``torch.manual_seed`` makes a run reproducible, eagerly and under
``torch.compile`` alike.

NOTE [Draws are saved, never redrawn]
    A backward pass must read the very numbers its forward pass drew. Under
    ``torch.compile``, AOTAutograd's partitioner recomputes in the backward
    graph any op that no forward *output* depends on, rather than saving its
    result, random ops included: a draw used only to pack a saved tensor would
    be drawn again in the backward, the backward would read other positions
    than the forward kept, and every estimate would be biased. Two things
    prevent it. The draw runs as the opaque custom op ``radgrad::draw`` (tagged
    ``nondeterministic_seeded``, so it is never merged with a twin call), and
    the op's forward output depends on what was drawn (the built-in ops
    return what they pack as extra outputs; a user's op calls
    :func:`radgrad.tie`), which bans moving the draw to the backward: the
    partitioner must save what it needs. Both apply only under compilation;
    eagerly the same function runs directly.
    Everything computed *from* a draw (indices, signs) is a deterministic
    function of it and may be recomputed freely. The custom op also takes the
    tensor it draws for as an (unread) input: the data dependency keeps the
    compiled graph from moving a draw before the tensor it draws for, hence
    (with every op's output tied to its draws) before the draws upstream of
    it. A model whose randomized ops form a chain therefore draws, compiled,
    the very numbers the eager model draws after the same
    ``torch.manual_seed``. Ops on parallel branches (a gated MLP's gate and
    up projections) may draw in another order compiled than eagerly: other
    numbers, as random; each mode is reproducible under its seed.

NOTE [Pairwise-independent uniforms]
    Stochastic rounding and norm-proportional sampling need a uniform number
    per entry of a ``rows x n`` grid. :func:`uniform` draws ``rows + n``
    integers ``a[r]``, ``b[s]`` uniform on ``[0, 2**23)`` and uses
    ``u[r, s] = ((a[r] + b[s]) mod 2**23) / 2**23``: as with the shared
    offsets of sampling (NOTE [Sampling with shared offsets] in
    :mod:`radgrad.estimators.sample`), every ``u[r, s]`` is uniform and any
    two are independent, so an estimate linear in terms that each read one
    ``u`` has the mean and covariance it would have with independent
    numbers, for the cost of ``rows + n`` draws. The sum is formed in
    floating point, ``frac(a[r] / 2**23 + b[s] / 2**23)``: two passes over
    the grid instead of four integer ones, and exact, since a multiple of
    ``2**-23`` below 2 fits float32's 24-bit significand. Grids of float64
    numbers use ``2**52`` in place of ``2**23`` (float64's 53-bit
    significand): a probability drawn against them, such as stochastic
    rounding's, is then exact to float64's grain rather than float32's (on
    a 2**-23 grid an entry within 2**-23 of a quantization level always
    rounds the same way, a bias of up to 2**-23 of a step).

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

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["draw", "draw_seed", "draw_grid", "uniform", "uniform_rows", "signs"]

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


# Defined with torch.library's low-level API: torch.library.custom_op adds about
# 15 us of Python per call, a draw's whole cost several times over.
_LIBRARY = torch.library.Library("radgrad", "DEF")
_LIBRARY.define("draw(Tensor after, int low, int high, SymInt[] shape, ScalarType dtype) -> Tensor",
                tags=(torch.Tag.nondeterministic_seeded,))


def _draw_kernel(after: Tensor, low: int, high: int, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    return _randint(low, high, shape, dtype, after.device, None)


def _draw_fake(after: Tensor, low: int, high: int, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    return after.new_empty(tuple(shape), dtype=dtype)


_LIBRARY.impl("draw", _draw_kernel, "CompositeExplicitAutograd")
torch.library.register_fake("radgrad::draw", _draw_fake, lib=_LIBRARY)

# NOTE [Two draws are never one]
#   AOTAutograd's common-subexpression pass merges two calls of one op with the
#   same arguments unless the op is on its own list of random ops; it does not
#   read the ``nondeterministic_seeded`` tag (torch 2.13). Two draws for one
#   tensor (the query, key and value layers reading one hidden state, a
#   normalization's two sampled sketches, or a user's op packing one tensor
#   twice) would become one: the sketches meant to be independent would
#   share their numbers, and a gradient that multiplies two of them would be
#   biased. radgrad::draw joins that list.
try:
    from torch._functorch import compile_utils as _compile_utils
except ImportError:  # pragma: no cover - the list moved; tests/test_compile.py would show the bias
    _compile_utils = None
if _compile_utils is not None and isinstance(getattr(_compile_utils, "rand_ops", None), list) \
        and torch.ops.radgrad.draw not in _compile_utils.rand_ops:
    _compile_utils.rand_ops.append(torch.ops.radgrad.draw)


def draw(low: int, high: int, shape: Sequence[int], dtype: torch.dtype, after: Tensor,
         generator: torch.Generator | None = None) -> Tensor:
    """Integers uniform on ``[low, high)``, on the device of ``after``.

    ``after`` is the tensor the draw is for; under ``torch.compile`` the draw
    is ordered after it (NOTE [Draws are saved, never redrawn]).
    """
    if generator is None and torch.compiler.is_compiling():
        # One entry of ``after`` orders the draw as well as all of it: given the
        # whole tensor, inductor would copy a strided (channels_last) one into
        # the custom op's expected layout first.
        anchor = after.detach()
        if anchor.numel():
            anchor = anchor[(0,) * anchor.dim()]
        return torch.ops.radgrad.draw(anchor, low, high, list(shape), dtype)
    if generator is None:
        _check_not_recomputing_reentrantly()
    return _randint(low, high, shape, dtype, after.device, generator)


# NOTE [Draws in recomputed layers]
#   Activation checkpointing runs a segment's forward again in the backward
#   pass, with torch's generators set back to their state when the segment
#   first ran (``preserve_rng_state``). Non-reentrant checkpointing
#   (``use_reentrant=False``) first ran the segment with gradients on, so
#   radgrad drew then and the recomputation draws the very same numbers:
#   every segment's numbers are its own. Reentrant checkpointing
#   (``use_reentrant=True``) first runs every segment under ``no_grad``, where
#   radgrad draws nothing; segments between which nothing else drew (no
#   dropout) are then recomputed from one and the same state and draw the
#   same numbers: sketches of different layers would share their randomness,
#   and a gradient that multiplies two of them would be biased (measured: three
#   checkpointed blocks of a converted MLP drew identical grids). A draw from
#   torch's default generator inside a backward pass, outside non-reentrant
#   checkpointing's recomputation, is refused.
_NON_REENTRANT_HOOKS = ("_recomputation_hook.", "_checkpoint_hook.")


def _check_not_recomputing_reentrantly() -> None:
    """Raise where a draw could repeat another segment's (NOTE [Draws in recomputed layers])."""
    if torch._C._current_graph_task_id() == -1:  # not inside a backward pass
        return
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    pack = hooks[0] if hooks else None
    if getattr(pack, "__module__", None) == "torch.utils.checkpoint" \
            and pack.__qualname__.startswith(_NON_REENTRANT_HOOKS):
        return
    raise RuntimeError(
        "radgrad: a randomized op ran inside a backward pass, as under reentrant activation checkpointing "
        "(use_reentrant=True), which recomputes segments from random states radgrad drew nothing from: "
        "the sketches of different layers could share their random numbers and bias the gradient. Use "
        "torch.utils.checkpoint.checkpoint(..., use_reentrant=False) (Hugging Face: checkpointing "
        "kwargs {'use_reentrant': False})."
    )


def uniform(rows: int, n: int, dtype: torch.dtype, after: Tensor,
            generator: torch.Generator | None = None) -> Tensor:
    """A ``(rows, n)`` grid of pairwise-independent uniforms on ``[0, 1)`` (NOTE [Pairwise-independent uniforms])."""
    return uniform_rows(draw_grid(rows, n, after, generator, dtype)[0], rows, 0, rows)


def draw_grid(rows: int, n: int, after: Tensor, generator: torch.Generator | None = None,
              dtype: torch.dtype = torch.float32, copies: int = 1) -> list[Tensor]:
    """``copies`` independent grids, drawn in one call: each the ``rows + n`` numbers, multiples of
    ``2**-23`` (float32) or ``2**-52`` (float64) in ``[0, 1)`` of ``dtype``, that define a grid of
    :func:`uniform` numbers (NOTE [Pairwise-independent uniforms])."""
    grain = 52 if dtype == torch.float64 else 23
    grids = draw(0, 2**grain, (copies * (rows + n),), dtype, after, generator).mul_(2.0**-grain)
    return [grids] if copies == 1 else list(grids.view(copies, rows + n).unbind(0))


def uniform_rows(grid: Tensor, rows: int, lo: int, hi: int, first: int = 0, last: int | None = None) -> Tensor:
    """Rows ``lo .. hi``, columns ``first .. last`` (all by default), of the uniforms defined by ``grid``
    (from :func:`draw_grid` for ``rows`` rows)."""
    columns = grid[rows + first:] if last is None else grid[rows + first:rows + last]
    return (grid[lo:hi, None] + columns[None]).frac_()


def draw_seed(after: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A 0-dim int64 tensor on the device of ``after``, uniform over all int64 values but one."""
    return draw(-(2**63), 2**63 - 1, (), torch.int64, after, generator)


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
