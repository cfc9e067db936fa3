"""Norm-proportional sampling: ``k`` draws per row, entry ``j`` with probability ``|x_j| / ||x||_1``.

NOTE [Norm-proportional sampling]
    Each of the ``k`` draws of a row picks entry ``j`` with probability
    ``p_j = |x_j| / sum_i |x_i|`` (with replacement) and stores
    ``x_j / (k p_j) = sign(x_j) ||x||_1 / k``; the estimate adds the stored
    values at their positions, so ``E = sum_j k p_j x_j / (k p_j) = x``.
    Among sampling schemes with replacement this ``p`` minimises the summed
    variance of the estimate, and zeros (a ReLU's output is half zeros) are
    never kept. Positions depend on the values, so they are stored:
    ``rows x k`` indices (int16 for rows up to 2**15 entries), counted in the
    memory, beside the values. The values of a row share one magnitude,
    so ``bits=1`` stores them exactly up to rounding.

    A draw inverts the row's cumulative sum at a uniform point. The uniform
    points are pairwise independent (NOTE [Pairwise-independent uniforms] in
    :mod:`radgrad.rng`), which gives the estimate the mean and covariance of
    independent draws. The probability actually used is the difference of
    the computed cumulative sums, so rounding in the sum cannot bias the
    estimate; an all-zero row is estimated by zeros, exactly, and a row
    holding inf or NaN by NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from radgrad import rng
from radgrad.estimators.sample import index_dtype

__all__ = ["gather", "scatter"]


def gather(xr: Tensor, k: int, after: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """``(values, indices)``, each ``(rows, k)``, for the ``(rows, D)`` rows ``xr``."""
    rows, d = xr.shape
    compute = torch.promote_types(xr.dtype, torch.float32)
    cum = xr.abs().to(compute).cumsum(-1)
    total = cum[:, -1:]
    u = rng.uniform(rows, k, compute, after, generator)
    idx = torch.searchsorted(cum, u.mul_(total), right=True).clamp_(max=d - 1)
    upper = cum.gather(-1, idx)
    lower = torch.where(idx > 0, cum.gather(-1, (idx - 1).clamp_(min=0)), 0)
    weight = upper - lower  # k p_j * total / k: the probability used, times the total
    picked = xr.gather(-1, idx).to(compute)
    # weight 0 only for an all-zero row (0 * total: 0), or where the sums overflowed or met a NaN
    # (0 * total: NaN, so a non-finite row never estimates finite numbers)
    values = torch.where(weight > 0, picked * total / (weight * k), total * 0)
    return values.to(xr.dtype), idx.to(index_dtype(d))


def scatter(values: Tensor, indices: Tensor, d: int) -> Tensor:
    """The ``(rows, D)`` estimate of the rows whose values and indices are given: every value added at its position."""
    return values.new_zeros(values.shape[0], d).scatter_add_(1, indices.long(), values)
