"""Random projections: store ``x S`` for a ``D x k`` matrix of random signs, return ``(x S) S^T / k``.

NOTE [Projection]
    ``E[S S^T] / k = I``, so the estimate is unbiased. Only a 64-bit seed is
    stored; the signs are rebuilt from it (NOTE [Counter-based signs] in
    :mod:`radgrad.rng`). ``per_example=True`` draws a matrix per row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from radgrad import rng
from radgrad.sizes import row_blocks

__all__ = ["project", "back_project"]

# Largest number of sign entries generated at once by a per-example projection.
_CHUNK = 2**22


def _sign_chunks(seed: Tensor, first: int, rows: int, d: int, k: int, dtype: torch.dtype):
    """Yield (lo, hi, signs): the ``(hi-lo, d, k)`` sign matrices of rows ``first + lo .. first + hi``."""
    for lo, hi in row_blocks(rows, max(1, _CHUNK // (d * k))):
        yield lo, hi, rng.signs(seed, (first + lo) * d * k, (hi - lo, d, k), dtype)


def project(xr: Tensor, seed: Tensor, k: int, per_example: bool) -> Tensor:
    """``x S``: the ``(rows, k)`` projections of the ``(rows, D)`` rows ``xr``."""
    rows, d = xr.shape
    if not per_example:
        return xr @ rng.signs(seed, 0, (d, k), xr.dtype)
    return torch.cat([torch.bmm(xr[lo:hi].unsqueeze(1), signs).squeeze(1)
                      for lo, hi, signs in _sign_chunks(seed, 0, rows, d, k, xr.dtype)])


def back_project(values: Tensor, seed: Tensor, first: int, d: int, per_example: bool) -> Tensor:
    """``(x S) S^T / k``: rows ``first ..`` of the estimate from their projections."""
    rows, k = values.shape
    if not per_example:
        return (values @ rng.signs(seed, 0, (d, k), values.dtype).t()).mul_(1.0 / k)
    est = torch.cat([torch.bmm(values[lo:hi].unsqueeze(1), signs.transpose(1, 2)).squeeze(1)
                     for lo, hi, signs in _sign_chunks(seed, first, rows, d, k, values.dtype)])
    return est.mul_(1.0 / k)
