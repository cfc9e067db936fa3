"""The estimators: pack a tensor into compact storage, unpack an unbiased estimate.

This is the one place where randomness and seeds live. Every RAD op in radgrad
(the layers, the pooling-free paths, the reactor, user ops) stores its saved
activations through :func:`pack` and reads them back through :func:`unpack`.

NOTE [Sketch layout]
    A tensor ``x`` is viewed as a matrix of ``rows x D``: its first
    ``batch_dims`` dimensions index rows, the remaining ones are flattened into
    the ``D`` entries of a row. A linear layer's input ``(B, ..., F)`` has
    ``batch_dims = x.dim() - 1`` (one row per example and position), a
    convolution's input ``(B, C, H, W)`` has ``batch_dims = 2`` (one row per
    example and channel, ``D = H * W`` spatial positions), a single state has
    ``batch_dims = 0`` (one row).

NOTE [Estimators]
    ``method="sample"`` keeps ``k = max(1, round(keep * D))`` entries of each
    row, drawn uniformly *with replacement*, and scales them by ``D / k``:
    the estimate is ``(D/k) sum_s e_{i_s} e_{i_s}^T x``, whose mean is ``x``.
    ``method="project"`` stores ``x S`` for a ``D x k`` matrix ``S`` of random
    signs and returns ``(x S) S^T / k``; ``E[S S^T] / k = I`` (the Rademacher
    projection with entries ``+-1/sqrt(k)``, with the scale applied once).
    ``per_example=True`` draws independent indices (or ``S``) for every row,
    ``per_example=False`` draws one set shared by all rows.

NOTE [Seeds]
    Only the kept values and one integer seed are stored: indices and sign
    matrices are rebuilt from the seed in the backward pass (indices by a
    counter-based hash of the seed, NOTE [Counter-based indices] in
    :mod:`radgrad.kernels`; signs by a torch generator seeded with it). Seeds are drawn
    from torch's default generator of the tensor's device, so
    ``torch.manual_seed`` makes a run bitwise reproducible. Under
    ``torch.distributed`` the rank is added to the seed: two ranks seeded alike
    still draw different samples. The CPU generator uses only the low 32 bits
    of a seed, so the rank enters those bits.

Exact: the forward value of every op (nothing here touches it) and ``keep=1``
(the tensor itself is stored, unchanged). Estimated: ``unpack(pack(x))`` for
``keep < 1``, unbiased for every method and ``per_example`` setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from radgrad import kernels

__all__ = ["METHODS", "SketchConfig", "Sketch", "pack", "unpack", "draw_seed"]

#: Names of the estimators, each with a one-line description (the CLI shows these).
METHODS: dict[str, str] = {
    "sample": "keep a uniform random subset of entries (with replacement), rescaled by D/k",
    "project": "store a random Rademacher projection x S and return (x S) S^T / k",
}

# Odd, so rank * _RANK_STRIDE differs between ranks in the low 32 bits of a seed.
_RANK_STRIDE = 0x9E3779B97F4A7C15
_DISTRIBUTED = torch.distributed.is_available()
# Largest number of sign entries generated at once by a per-example projection.
_PROJECT_CHUNK = 2**22


@dataclass(frozen=True)
class SketchConfig:
    """How a RAD op stores a tensor for the backward pass.

    Args:
        keep: fraction of each row's entries kept, in (0, 1]. ``1.0`` stores the
            tensor itself and gives exact gradients.
        method: ``"sample"`` or ``"project"`` (see :data:`METHODS`).
        per_example: independent randomness for every row (``True``, the
            paper's "different sample") or one draw shared by all rows
            (``False``, "same sample").

    Raises:
        ValueError: ``keep`` outside (0, 1] or not finite, or an unknown ``method``.
        TypeError: ``keep`` not a real number or ``per_example`` not a bool.
    """

    keep: float = 0.1
    method: str = "sample"
    per_example: bool = True

    def __post_init__(self) -> None:
        keep = self.keep
        if isinstance(keep, bool) or not isinstance(keep, (int, float)):
            raise TypeError(f"radgrad: keep must be a real number in (0, 1], got {keep!r}")
        if not math.isfinite(keep) or not 0.0 < keep <= 1.0:
            raise ValueError(f"radgrad: keep must be in (0, 1] and finite, got {keep!r}")
        object.__setattr__(self, "keep", float(keep))
        if self.method not in METHODS:
            raise ValueError(
                f"radgrad: method must be one of {sorted(METHODS)}, got {self.method!r}"
            )
        if not isinstance(self.per_example, bool):
            raise TypeError(f"radgrad: per_example must be True or False, got {self.per_example!r}")

    @property
    def exact(self) -> bool:
        """True when nothing is randomized (``keep == 1``)."""
        return self.keep == 1.0

    def kept(self, d: int) -> int:
        """Number of values kept from a row of ``d`` entries."""
        return max(1, round(self.keep * d))


class Sketch:
    """A packed tensor: the kept values plus what is needed to rebuild the rest.

    ``values`` is the only tensor; an autograd function saves it with
    ``ctx.save_for_backward`` (see :mod:`radgrad.saved`). For an exact config
    ``values`` is the original tensor and ``seed`` is ``None``. (A plain
    slotted class rather than a dataclass: one is built on every forward
    and backward of every RAD op, so construction cost matters.)
    """

    __slots__ = ("values", "seed", "shape", "batch_dims", "config")

    def __init__(self, values: Tensor | None, seed: int | None, shape: tuple[int, ...],
                 batch_dims: int, config: SketchConfig) -> None:
        self.values, self.seed, self.shape = values, seed, shape
        self.batch_dims, self.config = batch_dims, config

    def with_values(self, values: Tensor | None) -> Sketch:
        return Sketch(values, self.seed, self.shape, self.batch_dims, self.config)

    def unpack(self) -> Tensor:
        return unpack(self)

    def __repr__(self) -> str:
        return (f"Sketch(shape={self.shape}, batch_dims={self.batch_dims}, seed={self.seed}, "
                f"config={self.config})")


def draw_seed(device: torch.device | str = "cpu") -> int:
    """Draw a seed from torch's default generator of ``device``, mixed with the rank."""
    seed = kernels.draw_seed(device if isinstance(device, torch.device) else torch.device(device))
    if _DISTRIBUTED and torch.distributed.is_initialized():
        seed = (seed + torch.distributed.get_rank() * _RANK_STRIDE) % 2**63
    return seed


def pack(
    x: Tensor, config: SketchConfig, *, batch_dims: int, seed: int | None = None
) -> Sketch:
    """Pack ``x`` into a :class:`Sketch` whose :func:`unpack` is an unbiased estimate of ``x``.

    Args:
        x: a floating-point tensor.
        config: keep fraction, method and per-example setting.
        batch_dims: how many leading dimensions index rows (NOTE [Sketch layout]).
        seed: the seed to draw from, an int in [0, 2**63); by default a fresh
            one from torch's default generator (NOTE [Seeds]).

    Returns:
        A Sketch holding ``rows x k`` kept values (``k = max(1, round(keep * D))``)
        and the seed; for ``keep == 1`` it holds ``x`` itself.

    Raises:
        TypeError: ``x`` is not a floating-point tensor.
        ValueError: ``batch_dims`` is not between 0 and ``x.dim()``, or ``seed``
            is not an int in [0, 2**63).
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"radgrad: can only sketch floating-point tensors, got {got}")
    if not 0 <= batch_dims <= x.dim():
        raise ValueError(
            f"radgrad: batch_dims must be in [0, {x.dim()}] for a tensor of shape "
            f"{tuple(x.shape)}, got {batch_dims}"
        )
    shape = x.shape
    if config.exact:
        return Sketch(x, None, shape, batch_dims, config)
    rows, d = _rows_and_width(shape, batch_dims)
    k = config.kept(d)
    if seed is None:
        seed = draw_seed(x.device)
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"radgrad: seed must be an int in [0, 2**63), got {seed!r}")
    x2 = x.reshape(rows, d)
    if config.method == "sample":
        return Sketch(kernels.sample_pack(x2, k, config.per_example, seed), seed, shape, batch_dims, config)
    gen = _generator(seed, x.device)
    if config.per_example:
        values = torch.empty(rows, k, dtype=x.dtype, device=x.device)
        for lo, hi, signs in _sign_chunks(gen, rows, d, k, x.dtype, x.device):
            values[lo:hi] = torch.bmm(x2[lo:hi].unsqueeze(1), signs).squeeze(1)
    else:
        values = x2 @ _signs(gen, (d, k), x.dtype, x.device)
    return Sketch(values, seed, shape, batch_dims, config)


def unpack(sketch: Sketch) -> Tensor:
    """Rebuild the unbiased estimate of the packed tensor, with its original shape."""
    config, values = sketch.config, sketch.values
    if config.exact:
        return values
    rows, d = _rows_and_width(sketch.shape, sketch.batch_dims)
    k = values.shape[1]
    if config.method == "sample":
        est = kernels.sample_unpack(values, d, config.per_example, sketch.seed, d / k)
        return est.view(sketch.shape)
    gen = _generator(sketch.seed, values.device)
    if config.per_example:
        est = values.new_empty(rows, d)
        for lo, hi, signs in _sign_chunks(gen, rows, d, k, values.dtype, values.device):
            est[lo:hi] = torch.bmm(values[lo:hi].unsqueeze(1), signs.transpose(1, 2)).squeeze(1)
        est.mul_(1.0 / k)
    else:
        est = (values @ _signs(gen, (d, k), values.dtype, values.device).t()).mul_(1.0 / k)
    return est.view(sketch.shape)


def _rows_and_width(shape: tuple[int, ...], batch_dims: int) -> tuple[int, int]:
    return math.prod(shape[:batch_dims]), math.prod(shape[batch_dims:])


def _generator(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _signs(gen: torch.Generator, size: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    # +-1 entries: exact in every float dtype; the 1/k scale is applied once, in unpack.
    return torch.empty(size, dtype=dtype, device=device).bernoulli_(0.5, generator=gen).mul_(2).sub_(1)


def _sign_chunks(gen, rows, d, k, dtype, device):
    """Yield (lo, hi, signs) with independent ``(hi-lo, d, k)`` sign matrices, in a fixed order."""
    step = max(1, _PROJECT_CHUNK // (d * k))
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        yield lo, hi, _signs(gen, (hi - lo, d, k), dtype, device)
