"""Unbiased randomized gradient estimators on an LCG: path sampling and random matrix injection.

Both draw from torch's default generator (directly, or through
:func:`radgrad.pack` seeds), so ``torch.manual_seed`` makes them reproducible.
Both are *estimates*: exact only in expectation (and exactly for ``keep=1``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from radgrad.sketch import Sketch, SketchConfig, pack, unpack

if TYPE_CHECKING:
    from radgrad.lcg.graph import LCG
    from radgrad.lcg.jacobians import LocalJacobian

__all__ = ["MODES", "DIRECTIONS", "Injection", "sample_paths", "inject"]

#: Edge-choice rules of :func:`sample_paths`.
MODES: dict[str, str] = {
    "uniform": "every edge leaving a node is equally likely",
    "magnitude": "an edge's probability is proportional to |weight|",
}
#: Walk directions of :func:`sample_paths`.
DIRECTIONS: dict[str, str] = {
    "reverse": "n walkers start at the output scalar and follow edges backwards to input entries",
    "forward": "n walkers start at every input entry and follow edges forwards to the output",
}


class Injection(NamedTuple):
    """Result of :func:`inject`.

    Attributes:
        gradient: the unbiased gradient estimate, one tensor per input.
        stored: number of edge values kept for the backward pass.
        exact: number exact reverse mode keeps (every stored tensor in full).
    """

    gradient: tuple[Tensor, ...]
    stored: int
    exact: int


def sample_paths(
    graph: LCG, n: int, *, mode: str = "uniform", direction: str = "reverse"
) -> tuple[Tensor, ...]:
    """Path-sampling estimate of the gradient (Bauer's formula by Monte Carlo).

    Walkers move through the scalar-level graph (:mod:`radgrad.lcg.scalars`),
    visiting its vertices once, in topological order (``"forward"``) or in
    reverse (``"reverse"``). At every node each walker there picks one of the
    node's edges in the walk direction with probability ``p`` (``mode``) and
    multiplies its weight by ``edge weight / p``; a walker at a node whose edges
    all have probability zero stops and counts zero. A finished walker's
    weight divided by ``n`` is added to the gradient entry of its input end.
    ``E[weight * 1{walker ends at x_i}] = sum over paths x_i -> output of the
    product of their weights``, so the estimate is unbiased for every entry.

    ``"reverse"`` draws ``n`` paths in all (from the output scalar back to the
    input entries); ``"forward"`` draws ``n`` paths from every input entry.

    Args:
        graph: the LCG.
        n: number of walkers per start node, a positive int.
        mode: ``"uniform"`` or ``"magnitude"`` (see :data:`MODES`).
        direction: ``"reverse"`` or ``"forward"`` (see :data:`DIRECTIONS`).

    Raises:
        ValueError: ``n`` not a positive int, unknown ``mode`` or ``direction``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"radgrad.lcg: n must be a positive int, got {n!r}")
    _check_choice("mode", mode, MODES)
    _check_choice("direction", direction, DIRECTIONS)
    s = graph.scalars
    n_vertices = len(graph.vertices)
    input_ids = torch.cat([torch.arange(*s.block(i)) for i in graph.inputs])
    if direction == "reverse":
        pos = torch.full((n,), s.sink, dtype=torch.long)
        terminal = set(graph.inputs)
        order = range(n_vertices, -1, -1)  # the sink block first
    else:
        pos = input_ids.repeat_interleave(n)
        terminal = {n_vertices}
        order = range(n_vertices + 1)
    origin = pos.clone()
    weight = torch.ones(pos.shape, dtype=torch.float64)
    for b in order:
        if b in terminal:
            continue
        table = s.table(b, direction)
        here = ((pos >= table.lo) & (pos < table.hi)).nonzero(as_tuple=True)[0]
        if here.numel() == 0:
            continue
        rows = pos[here] - table.lo
        if mode == "uniform":
            probs = table.valid[rows].to(torch.float64)
        else:
            probs = table.weights[rows].abs()
        total = probs.sum(1)
        alive = total > 0
        pos[here[~alive]] = -1
        weight[here[~alive]] = 0.0
        here, rows, probs, total = here[alive], rows[alive], probs[alive], total[alive]
        if here.numel() == 0:
            continue
        choice = torch.multinomial(probs, 1).squeeze(1)
        p = probs[torch.arange(choice.numel()), choice] / total
        weight[here] *= table.weights[rows, choice] / p
        pos[here] = table.neighbours[rows, choice]
    if direction == "forward":
        done, end = pos == s.sink, origin
    else:
        done, end = torch.isin(pos, input_ids), pos
    flat = torch.zeros(s.num_nodes, dtype=torch.float64)
    flat.index_add_(0, end[done], weight[done] / n)
    return tuple(_split(graph, flat))


def inject(
    graph: LCG,
    keep: float,
    *,
    method: str = "sample",
    per_example: bool = True,
    at: Iterable[int | str] | None = None,
) -> Injection:
    """Random matrix injection: reverse accumulation with sketched edge values at the vertices ``at``.

    Injecting at vertex ``v`` replaces the stored tensor ``s`` of every edge
    into ``v`` (the forward values its local Jacobian needs, e.g. the
    derivative vector ``d`` of ``tanh`` or ``mul``, the other operand of a
    matmul) by ``P s = radgrad.unpack(radgrad.pack(s, ...))``, with one draw
    per vertex (and stored shape): ``P`` is drawn once for ``v``, ``E[P] = I``. Only the packed
    values are kept: ``k = max(1, round(keep * D))`` per row of ``s`` (the last
    dimension is ``D``, the leading ones index rows, NOTE [Sketch layout] in
    :mod:`radgrad.sketch`). For ``method="sample"`` and a diagonal Jacobian,
    ``diag(P d) = P diag(d)``: this is exactly ``J_out P J_in`` with
    ``P = (D/k) sum_s e_{i_s} e_{i_s}^T``. In general each Jacobian is linear in
    its stored tensor, so it is unbiased in expectation.

    Unbiased: each scalar path enters a vertex through one edge, so the sketches
    on one path are independent (different vertices draw independently) and
    the expected product is the product of the expectations. Edges with a
    constant Jacobian (``add``, ``sum``, reshapes, ``2 * x``) store nothing
    and are left exact.

    Args:
        graph: the LCG.
        keep: fraction of each stored row kept, in (0, 1]; ``1`` is exact.
        method: ``"sample"`` or ``"project"`` (:data:`radgrad.METHODS`).
        per_example: independent randomness for every row of a stored tensor.
        at: vertices (indices or names) to inject at; default: every vertex
            that is not an input (every vertex with a local Jacobian).

    Returns:
        :class:`Injection`: the estimate, the number of values stored (sketched
        ones at ``at``, full tensors elsewhere) and the exact count.

    Raises:
        ValueError: ``keep`` invalid (from :class:`radgrad.SketchConfig`), ``method`` not
            ``"sample"`` or ``"project"``,
            an unknown vertex, or an input vertex in ``at``.
    """
    if method not in ("sample", "project"):
        raise ValueError(f"radgrad.lcg: method must be 'sample' or 'project' (the counts here are of stored "
                         f"values, which only these keep in full precision), got {method!r}")
    config = SketchConfig(keep, method, per_example)
    targets = injection_targets(graph, at)
    replaced: dict[int, LocalJacobian] = {}
    first: dict[tuple[int, torch.Size], Sketch] = {}  # one draw per vertex and stored shape
    stored = exact = 0
    for i, edge in enumerate(graph.edges):
        s = edge.jacobian.stored
        if s is None:
            continue
        exact += s.numel()
        if edge.dst not in targets:
            stored += s.numel()
            continue
        key = (edge.dst, s.shape)
        shared = first.get(key)
        sketch = pack(s, config, batch_dims=max(s.dim() - 1, 0), state=None if shared is None else shared.state)
        first.setdefault(key, sketch)
        stored += sketch.values.numel()
        replaced[i] = edge.jacobian.with_stored(unpack(sketch))
    gradient = graph.reverse(lambda i, edge: replaced.get(i, edge.jacobian))
    return Injection(gradient, stored, exact)


def injection_targets(graph: LCG, at: Iterable[int | str] | None) -> set[int]:
    """Vertex indices ``inject(..., at=at)`` sketches (validated)."""
    if at is None:
        return set(range(len(graph.vertices))) - set(graph.inputs)
    if isinstance(at, (str, int)):
        raise TypeError(f"radgrad.lcg: at must be an iterable of vertices, got {at!r}")
    targets = {graph.index(key) for key in at}
    for v in targets & set(graph.inputs):
        raise ValueError(
            f"radgrad.lcg: cannot inject at input vertex {graph.vertices[v].name!r}: "
            "it has no local Jacobian"
        )
    return targets


def _check_choice(name: str, value: str, choices: dict[str, str]) -> None:
    if value not in choices:
        raise ValueError(f"radgrad.lcg: {name} must be one of {sorted(choices)}, got {value!r}")


def _split(graph: LCG, flat: Tensor) -> list[Tensor]:
    s = graph.scalars
    out = []
    for i in graph.inputs:
        lo, hi = s.block(i)
        value = graph.vertices[i].value
        out.append(flat[lo:hi].to(value.dtype).reshape(value.shape))
    return out
