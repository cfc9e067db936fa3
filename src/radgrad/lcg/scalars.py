"""The scalar-level view of an LCG: one node per tensor entry, one edge per nonzero Jacobian entry.

Bauer's formula and path sampling work on this view. Entries of vertex ``v``
get the consecutive ids ``offsets[v] .. offsets[v + 1] - 1`` (row-major), so
ids are in topological order; one extra *sink* node (id ``offsets[-1]``)
stands for the scalar ``<cotangent, output>`` whose gradient the LCG computes,
with an edge of weight ``cotangent[j]`` from every output entry ``j``.

Edges are *structural*: a diagonal Jacobian has its ``numel`` entries even where
a weight happens to be zero (a ReLU that is off), a matmul Jacobian is dense.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from radgrad.lcg.graph import LCG

Direction = Literal["forward", "reverse"]


@dataclass(frozen=True)
class NeighbourTable:
    """Edges leaving the nodes of one block in one direction, padded to the block's largest degree.

    Row ``r`` lists node ``lo + r``'s neighbours (``-1`` pads) and edge weights.
    """

    lo: int
    hi: int
    neighbours: Tensor  # (hi - lo, max_degree) long
    weights: Tensor  # (hi - lo, max_degree) float
    valid: Tensor  # (hi - lo, max_degree) bool


@dataclass(frozen=True)
class ScalarGraph:
    """Scalar nodes and edges of an LCG (see the module docstring)."""

    offsets: tuple[int, ...]
    src: Tensor
    dst: Tensor
    weight: Tensor
    _tables: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def sink(self) -> int:
        return self.offsets[-1]

    @property
    def num_nodes(self) -> int:
        return self.sink + 1

    def block(self, b: int) -> tuple[int, int]:
        """Id range ``[lo, hi)`` of vertex ``b`` (``b == len(vertices)`` is the sink)."""
        return self.offsets[b], (self.offsets[b + 1] if b + 1 < len(self.offsets) else self.sink + 1)

    @classmethod
    def from_lcg(cls, graph: LCG) -> ScalarGraph:
        sizes = [v.value.numel() for v in graph.vertices]
        offsets = tuple(int(o) for o in torch.tensor([0, *sizes]).cumsum(0).tolist())
        srcs, dsts, weights = [], [], []
        for edge in graph.edges:
            dense = edge.jacobian.dense().to(torch.float64)
            rows, cols = edge.jacobian.structure().dense().nonzero(as_tuple=True)
            srcs.append(cols + offsets[edge.src])
            dsts.append(rows + offsets[edge.dst])
            weights.append(dense[rows, cols])
        out_lo = offsets[graph.output]
        n_out = sizes[graph.output]
        srcs.append(torch.arange(out_lo, out_lo + n_out))
        dsts.append(torch.full((n_out,), offsets[-1], dtype=torch.long))
        weights.append(graph.cotangent.reshape(-1).to(torch.float64))
        return cls(offsets, torch.cat(srcs), torch.cat(dsts), torch.cat(weights))

    def successors(self) -> list[list[tuple[int, float]]]:
        """Python adjacency lists ``node -> [(successor, weight), ...]`` (for exact enumeration)."""
        succ: list[list[tuple[int, float]]] = [[] for _ in range(self.num_nodes)]
        for s, d, w in zip(self.src.tolist(), self.dst.tolist(), self.weight.tolist()):
            succ[s].append((d, w))
        return succ

    def count_paths(self, starts: range) -> int:
        """Exact number of structural paths from the nodes ``starts`` to the sink."""
        count = [0] * self.num_nodes
        count[self.sink] = 1
        order = torch.argsort(self.src, descending=True, stable=True).tolist()
        src, dst = self.src.tolist(), self.dst.tolist()
        for e in order:  # sources in decreasing id order: successors are already counted
            count[src[e]] += count[dst[e]]
        return sum(count[i] for i in starts)

    def table(self, b: int, direction: Direction) -> NeighbourTable:
        """The padded neighbour table of block ``b``: successors (forward) or predecessors (reverse)."""
        key = (b, direction)
        if key not in self._tables:
            here, there = (self.src, self.dst) if direction == "forward" else (self.dst, self.src)
            lo, hi = self.block(b)
            mine = ((here >= lo) & (here < hi)).nonzero(as_tuple=True)[0]
            rows = here[mine] - lo
            order = torch.argsort(rows, stable=True)
            mine, rows = mine[order], rows[order]
            degree = torch.bincount(rows, minlength=hi - lo)
            width = int(degree.max()) if degree.numel() else 0
            starts = degree.cumsum(0) - degree
            rank = torch.arange(rows.numel()) - starts[rows]
            neighbours = torch.full((hi - lo, width), -1, dtype=torch.long)
            weights = torch.zeros((hi - lo, width), dtype=torch.float64)
            neighbours[rows, rank] = there[mine]
            weights[rows, rank] = self.weight[mine]
            self._tables[key] = NeighbourTable(lo, hi, neighbours, weights, neighbours >= 0)
        return self._tables[key]
