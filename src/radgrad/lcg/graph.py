"""The linearized computational graph (LCG) and its exact gradients.

Vertices are the values of a traced function (its inputs, every intermediate
that depends on an input and reaches the output, and the output), in
topological order. Edges carry structured local Jacobians
(:mod:`radgrad.lcg.jacobians`). The graph computes the gradient of the scalar
``<cotangent, output>`` (``cotangent`` defaults to ones: the gradient of
``output.sum()``, which for a scalar output is the plain gradient).

Exact: :meth:`LCG.gradient` (reverse accumulation) and :meth:`LCG.path_sum`
(Bauer's formula, enumerating every scalar path). Estimated, unbiased:
:meth:`LCG.sample_paths` and :meth:`LCG.inject` (:mod:`radgrad.lcg.estimators`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from radgrad.lcg import estimators
from radgrad.lcg.jacobians import LocalJacobian
from radgrad.lcg.scalars import Direction, ScalarGraph

__all__ = ["Vertex", "Edge", "LCG"]

#: Default limit on the number of scalar paths :meth:`LCG.path_sum` enumerates.
MAX_PATHS = 100_000


@dataclass(frozen=True)
class Vertex:
    """A value of the traced function: its graph node name, the aten op that made it, its value."""

    name: str
    op: str
    value: Tensor


@dataclass(frozen=True)
class Edge:
    """``src -> dst`` (vertex indices) with the local Jacobian ``d dst / d src``."""

    src: int
    dst: int
    jacobian: LocalJacobian


class LCG:
    """A linearized computational graph; build one with :func:`radgrad.lcg.trace`.

    Attributes:
        vertices: the values, in topological order.
        edges: the local Jacobians; parallel edges (``x * x``) are kept apart.
        inputs: vertex indices of the traced function's inputs, in argument order.
        output: vertex index of the output.
        cotangent: the output cotangent (shape of the output).
    """

    def __init__(
        self,
        vertices: tuple[Vertex, ...],
        edges: tuple[Edge, ...],
        inputs: tuple[int, ...],
        output: int,
        cotangent: Tensor,
    ) -> None:
        self.vertices = vertices
        self.edges = edges
        self.inputs = inputs
        self.output = output
        self.cotangent = cotangent

    def __repr__(self) -> str:
        names = ", ".join(v.name for v in self.vertices)
        return f"LCG({len(self.vertices)} vertices [{names}], {len(self.edges)} edges)"

    def index(self, key: int | str) -> int:
        """Vertex index of ``key`` (an index or a vertex name).

        Raises:
            ValueError: no such vertex.
        """
        if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(self.vertices):
            return key
        for i, vertex in enumerate(self.vertices):
            if vertex.name == key:
                return i
        names = [v.name for v in self.vertices]
        raise ValueError(f"radgrad.lcg: no vertex {key!r}; vertices are {names}")

    # --- exact --------------------------------------------------------------------

    def gradient(self) -> tuple[Tensor, ...]:
        """Exact gradient of ``<cotangent, output>`` w.r.t. each input, by reverse accumulation."""
        return self.reverse(lambda i, edge: edge.jacobian)

    def reverse(self, jacobian: Callable[[int, Edge], LocalJacobian]) -> tuple[Tensor, ...]:
        """Reverse accumulation with edge ``i``'s Jacobian replaced by ``jacobian(i, edge)``.

        Exact for the Jacobians it is given; :meth:`gradient` passes the true ones.
        """
        adjoint: list[Tensor | None] = [None] * len(self.vertices)
        adjoint[self.output] = self.cotangent
        into: list[list[int]] = [[] for _ in self.vertices]
        for i, edge in enumerate(self.edges):
            into[edge.dst].append(i)
        for v in reversed(range(len(self.vertices))):
            g = adjoint[v]
            if g is None:
                continue
            for i in into[v]:
                edge = self.edges[i]
                contribution = jacobian(i, edge).vjp(g)
                prev = adjoint[edge.src]
                adjoint[edge.src] = contribution if prev is None else prev + contribution
        return tuple(
            torch.zeros_like(self.vertices[i].value) if adjoint[i] is None else adjoint[i].clone()
            for i in self.inputs
        )

    def count_paths(self) -> int:
        """Exact number of scalar-level paths from input entries to the output scalar."""
        s = self.scalars
        return sum(s.count_paths(range(*s.block(i))) for i in self.inputs)

    def path_sum(self, max_paths: int = MAX_PATHS) -> tuple[Tensor, ...]:
        """Exact gradient by Bauer's formula: enumerate every scalar path, sum the weight products.

        For every input entry, each path from it to the output scalar is visited
        explicitly and the products along the paths are summed with
        :func:`math.fsum`. The cost is the number of paths times their length.

        Raises:
            ValueError: more than ``max_paths`` paths (see :meth:`count_paths`).
        """
        n_paths = self.count_paths()
        if n_paths > max_paths:
            raise ValueError(
                f"radgrad.lcg: path_sum would enumerate {n_paths} scalar paths, more than "
                f"max_paths={max_paths}; use gradient() or sample_paths() for this graph"
            )
        s = self.scalars
        succ = s.successors()
        grads = []
        for i in self.inputs:
            lo, hi = s.block(i)
            flat = []
            for start in range(lo, hi):
                products = []
                stack = [(start, 1.0)]
                while stack:
                    node, product = stack.pop()
                    if node == s.sink:
                        products.append(product)
                    stack.extend((nxt, product * w) for nxt, w in succ[node])
                flat.append(math.fsum(products))
            value = self.vertices[i].value
            grads.append(torch.tensor(flat, dtype=value.dtype).reshape(value.shape))
        return tuple(grads)

    @cached_property
    def scalars(self) -> ScalarGraph:
        """The scalar-level view (:mod:`radgrad.lcg.scalars`), built on first use."""
        return ScalarGraph.from_lcg(self)

    # --- estimated -----------------------------------------------------------------

    def sample_paths(
        self, n: int, *, mode: str = "uniform", direction: Direction = "reverse"
    ) -> tuple[Tensor, ...]:
        """Unbiased gradient estimate from ``n`` randomly sampled paths per start node.

        See :func:`radgrad.lcg.estimators.sample_paths`.
        """
        return estimators.sample_paths(self, n, mode=mode, direction=direction)

    def inject(
        self,
        keep: float,
        *,
        method: str = "sample",
        per_example: bool = True,
        at: Iterable[int | str] | None = None,
    ) -> estimators.Injection:
        """Unbiased gradient estimate with random matrix injection at the vertices ``at``.

        See :func:`radgrad.lcg.estimators.inject`.
        """
        return estimators.inject(self, keep, method=method, per_example=per_example, at=at)
