"""Local Jacobians: the structured edge weights of the linearized computational graph.

Every edge ``u -> v`` of an LCG carries the local Jacobian ``dv/du`` as a small
linear map that keeps its structure instead of a dense matrix:

* :class:`Elementwise` -- ``dv = d * broadcast(du)``: a diagonal (the vector
  ``d``, or a Python number for a constant such as ``add``, ``neg``, ``2 * x``),
  after broadcasting ``u``'s shape to ``v``'s (``expand`` is the case ``d = 1``).
* :class:`Reduce` -- ``dv = scale * du.sum(dims)`` (``sum``, ``mean``).
* :class:`Reshape` and :class:`Permute` -- a permutation of the entries.
* :class:`MatMul` -- ``dv = du @ w`` or ``dv = w @ du`` (``mm``, ``mv``, ``dot``,
  ``bmm``): the other operand ``w``.

Each map has an exact forward product :meth:`~LocalJacobian.jvp` and an exact
transpose product :meth:`~LocalJacobian.vjp`. The forward values an edge must
keep for the backward pass are :attr:`~LocalJacobian.stored` (``None`` when the
Jacobian is a constant); every Jacobian is *linear* in its stored tensor, so
replacing that tensor by an unbiased estimate (:meth:`~LocalJacobian.with_stored`)
gives an unbiased Jacobian.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import torch
from torch import Tensor

__all__ = ["LocalJacobian", "Elementwise", "Reduce", "Reshape", "Permute", "MatMul"]


class LocalJacobian(ABC):
    """A linear map from tangents of shape ``in_shape`` to tangents of shape ``out_shape``."""

    in_shape: torch.Size
    out_shape: torch.Size
    dtype: torch.dtype

    @abstractmethod
    def jvp(self, t: Tensor) -> Tensor:
        """Exact forward product ``J t`` for a tangent ``t`` of shape ``in_shape``."""

    @abstractmethod
    def vjp(self, g: Tensor) -> Tensor:
        """Exact transpose product ``J^T g`` for a cotangent ``g`` of shape ``out_shape``."""

    @property
    def stored(self) -> Tensor | None:
        """The forward values this Jacobian keeps for the backward pass (``None``: constant)."""
        return None

    def with_stored(self, stored: Tensor) -> LocalJacobian:
        """The same map with :attr:`stored` replaced (the map is linear in it)."""
        raise TypeError(f"radgrad.lcg: {type(self).__name__} stores no values to replace")

    def structure(self) -> LocalJacobian:
        """The same sparsity pattern with every nonzero weight set to one."""
        return self

    def dense(self) -> Tensor:
        """The exact Jacobian as a ``(out_numel, in_numel)`` matrix (row-major flattening)."""
        n_in = math.prod(self.in_shape)
        basis = torch.eye(n_in, dtype=self.dtype).reshape(n_in, *self.in_shape)
        cols = torch.func.vmap(self.jvp)(basis)  # (n_in, *out_shape): column i is J e_i
        return cols.reshape(n_in, -1).t()



@dataclass(frozen=True)
class Elementwise(LocalJacobian):
    """``dv = d * broadcast_to(du, out_shape)``: a (broadcast) diagonal Jacobian.

    ``d`` is a tensor of shape ``out_shape`` (stored) or a Python number (constant).
    """

    d: Tensor | float
    in_shape: torch.Size
    out_shape: torch.Size
    dtype: torch.dtype

    def jvp(self, t: Tensor) -> Tensor:
        return t.expand(self.out_shape) * self.d

    def vjp(self, g: Tensor) -> Tensor:
        return (g * self.d).sum_to_size(self.in_shape)

    @property
    def stored(self) -> Tensor | None:
        return self.d if isinstance(self.d, Tensor) else None

    def with_stored(self, stored: Tensor) -> Elementwise:
        return replace(self, d=stored)

    def structure(self) -> Elementwise:
        return replace(self, d=1.0)


@dataclass(frozen=True)
class Reduce(LocalJacobian):
    """``dv = scale * du.sum(dims, keepdim)`` (``sum``: scale 1, ``mean``: 1/count)."""

    in_shape: torch.Size
    out_shape: torch.Size
    dims: tuple[int, ...]
    keepdim: bool
    scale: float
    dtype: torch.dtype

    def jvp(self, t: Tensor) -> Tensor:
        return t.sum(self.dims, keepdim=self.keepdim) * self.scale

    def vjp(self, g: Tensor) -> Tensor:
        kept = [1 if i in self.dims else n for i, n in enumerate(self.in_shape)]
        return (g.reshape(kept) * self.scale).expand(self.in_shape)


@dataclass(frozen=True)
class Reshape(LocalJacobian):
    """``dv = du.reshape(out_shape)`` (views, squeeze/unsqueeze, clone)."""

    in_shape: torch.Size
    out_shape: torch.Size
    dtype: torch.dtype

    def jvp(self, t: Tensor) -> Tensor:
        return t.reshape(self.out_shape)

    def vjp(self, g: Tensor) -> Tensor:
        return g.reshape(self.in_shape)


@dataclass(frozen=True)
class Permute(LocalJacobian):
    """``dv = du.permute(perm)`` (``t``, ``transpose``, ``permute``)."""

    in_shape: torch.Size
    out_shape: torch.Size
    perm: tuple[int, ...]
    dtype: torch.dtype

    def jvp(self, t: Tensor) -> Tensor:
        return t.permute(self.perm)

    def vjp(self, g: Tensor) -> Tensor:
        inverse = sorted(range(len(self.perm)), key=self.perm.__getitem__)
        return g.permute(inverse)


@dataclass(frozen=True)
class MatMul(LocalJacobian):
    """``dv = du @ w`` (``left=True``, ``u`` is the left operand) or ``dv = w @ du``.

    Operands follow :func:`torch.matmul` rules for 1-D, 2-D and batched 3-D
    tensors; the stored tensor is the other operand ``w``.
    """

    w: Tensor
    left: bool
    in_shape: torch.Size
    out_shape: torch.Size

    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        return self.w.dtype

    def jvp(self, t: Tensor) -> Tensor:
        return t @ self.w if self.left else self.w @ t

    def vjp(self, g: Tensor) -> Tensor:
        # Promote 1-D operands to matrices as torch.matmul does, use the 2-D
        # transpose rules, then drop the promoted dimensions again.
        if self.left:
            w = self.w.unsqueeze(-1) if self.w.dim() == 1 else self.w
            rows = (1,) if len(self.in_shape) == 1 else tuple(self.in_shape[:-1])
            grad = g.reshape(*rows, w.shape[-1]) @ w.mT
        else:
            w = self.w.unsqueeze(0) if self.w.dim() == 1 else self.w
            cols = (1,) if len(self.in_shape) == 1 else (self.in_shape[-1],)
            grad = w.mT @ g.reshape(*w.shape[:-2], w.shape[-2], *cols)
        return grad.reshape(self.in_shape)

    @property
    def stored(self) -> Tensor:
        return self.w

    def with_stored(self, stored: Tensor) -> MatMul:
        return replace(self, w=stored)

    def structure(self) -> MatMul:
        return replace(self, w=torch.ones_like(self.w))
