"""Variance of the LCG estimators against depth on two graph families (the paper's Figure 2).

* ``independent``: ``h <- tanh(c_l * h)`` on a vector of ``width`` entries,
  ``c_l`` a constant vector -- every input entry has its own single path.
* ``interleaved``: ``h <- tanh(h @ W_l)``, ``W_l`` a dense constant matrix --
  every entry of one layer feeds every entry of the next, so an input entry
  has ``width ** depth`` paths.

Both compute ``y = sum(h_L)`` and have two stored tensors per layer (the
weight and ``tanh``'s derivative). The statistic is the *relative variance*
``E ||g_hat - g||^2 / ||g||^2`` of an estimate ``g_hat`` of ``g = dy/dx``.

Measured: from independent repetitions (the exact ``g`` is known), with a
standard error; for path sampling, of a single path (the measured variance of
an ``n``-path mean times ``n``, an exact identity for independent paths).
Exact (computed, no sampling): :func:`path_sampling_relvar` for path sampling
and :func:`inject_relvar` for ``inject(method="sample", per_example=True)``.
The exact values matter: these estimators are heavy-tailed (a deep sketched
chain is usually zero, rarely huge), so a few hundred repetitions miss the
rare large values and under-estimate the variance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from radgrad.lcg.estimators import injection_targets
from radgrad.lcg.graph import LCG
from radgrad.lcg.trace import trace
from radgrad.sketch import SketchConfig

__all__ = [
    "GRAPHS", "ESTIMATORS", "VarianceConfig", "Row", "build",
    "path_sampling_relvar", "inject_relvar", "study",
]

#: The graph families, with a one-line description.
GRAPHS: dict[str, str] = {
    "independent": "h <- tanh(c_l * h), c_l a constant vector: one path per input entry",
    "interleaved": "h <- tanh(h @ W_l), W_l a dense constant matrix: width**depth paths per entry",
}

#: The estimators, with a one-line description.
ESTIMATORS: dict[str, str] = {
    "paths-uniform": "path sampling (reverse walk), uniform edge choice, one path",
    "paths-magnitude": "path sampling (reverse walk), edge choice proportional to |weight|, one path",
    "inject-sample": "random matrix injection at every vertex, method='sample'",
    "inject-project": "random matrix injection at every vertex, method='project'",
    "inject-sample-last": "random matrix injection at the last tanh only, method='sample'",
}


@dataclass(frozen=True)
class VarianceConfig:
    """Settings of the study: graph width, depths 1..max_depth, repetitions, keep, paths, seed."""

    width: int = 8
    max_depth: int = 8
    reps: int = 300
    keep: float = 0.5
    paths: int = 64
    seed: int = 0


@dataclass(frozen=True)
class Row:
    """One point: graph, depth, estimator, measured relative variance (and SE), exact value."""

    graph: str
    depth: int
    estimator: str
    measured: float
    se: float
    exact: float | None
    scalar_paths: int
    stored: int
    exact_stored: int


def build(kind: str, depth: int, width: int, seed: int) -> LCG:
    """The LCG of a ``kind`` graph (see :data:`GRAPHS`) of ``depth`` layers; constants from ``seed``.

    Graphs of one seed are nested: depth ``L`` uses the first ``L`` layers of depth ``L + 1``.
    """
    if kind not in GRAPHS:
        raise ValueError(f"radgrad.lcg: graph must be one of {sorted(GRAPHS)}, got {kind!r}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(width, generator=gen, dtype=torch.float64)
    layers = []
    for _ in range(depth):
        dense = torch.randn(width, width, generator=gen, dtype=torch.float64) * (1.2 / math.sqrt(width))
        diag = 0.8 + 0.4 * torch.rand(width, generator=gen, dtype=torch.float64)
        layers.append(dense if kind == "interleaved" else diag)

    def fn(h: Tensor) -> Tensor:
        for w in layers:
            h = torch.tanh(h @ w if kind == "interleaved" else h * w)
        return h.sum()

    return trace(fn, x)


def _norm2(graph: LCG) -> float:
    return float(sum(g.double().pow(2).sum() for g in graph.gradient()))


def path_sampling_relvar(graph: LCG, mode: str) -> float:
    """Exact relative variance of ``graph.sample_paths(1, mode=mode)`` (reverse walk, one path).

    ``E||g_hat||^2 = sum over paths (weight^2 / probability)``, accumulated
    backwards from the output scalar with the walk's own edge probabilities.
    """
    s = graph.scalars
    acc = torch.zeros(s.num_nodes, dtype=torch.float64)
    acc[s.sink] = 1.0
    for b in range(len(graph.vertices), -1, -1):
        if b in graph.inputs:
            continue
        t = s.table(b, "reverse")
        probs = t.valid.to(torch.float64) if mode == "uniform" else t.weights.abs()
        total = probs.sum(1, keepdim=True)
        use = t.valid & (probs > 0)
        term = acc[t.lo : t.hi, None] * t.weights.pow(2) * total / probs.where(use, 1.0)
        acc.index_add_(0, t.neighbours[use], term[use])
    second = sum(float(acc[slice(*s.block(i))].sum()) for i in graph.inputs)
    return second / _norm2(graph) - 1.0


def inject_relvar(graph: LCG, keep: float, at: Iterable[int | str] | None = None) -> float:
    """Exact relative variance of ``graph.inject(keep, method="sample", at=at)`` (per example).

    Propagates the second moment ``M = E[a a^T]`` of the adjoint backwards.
    An edge's Jacobian is linear in its stored tensor ``s``: ``J = sum_q s_q A_q``.
    Sketched, ``s_q`` becomes ``s_q c_q`` with ``E[c_q c_r]`` equal to 1 across
    rows, ``(k-1)/k`` within a row and ``1 + (D-1)/k`` for ``q = r``, so
    ``M <- sum_{q,r} E[c_q c_r] s_q s_r A_q^T M A_r``; unsketched, ``M <- J^T M J``.

    Raises:
        NotImplementedError: a vertex with more than one incoming edge (only
            chains of ops are supported: their adjoints have one second moment).
    """
    targets = injection_targets(graph, at)
    into = {}
    for edge in graph.edges:
        if edge.dst in into:
            name = graph.vertices[edge.dst].name
            raise NotImplementedError(
                f"radgrad.lcg: exact injection variance needs one edge into every vertex, "
                f"{name!r} has more"
            )
        into[edge.dst] = edge
    config = SketchConfig(keep)
    c = graph.cotangent.reshape(-1).to(torch.float64)
    moment = torch.outer(c, c)
    v = graph.output
    while v in into:
        jac = into[v].jacobian
        s = jac.stored
        if s is None or v not in targets or config.exact:
            dense = jac.dense().to(torch.float64)
            moment = dense.t() @ moment @ dense
        else:
            d = s.shape[-1] if s.dim() else 1
            k = config.kept(d)
            flat = s.reshape(-1).to(torch.float64)
            row = torch.arange(flat.numel()) // d
            same = (row[:, None] == row[None, :]).to(torch.float64)
            pair = 1.0 + same * ((k - 1) / k - 1.0)
            pair.diagonal().fill_(1.0 + (d - 1) / k)
            basis = torch.eye(flat.numel(), dtype=s.dtype).reshape(-1, *s.shape)
            parts = torch.stack([jac.with_stored(e).dense() for e in basis]).to(torch.float64)
            parts = parts * flat[:, None, None]  # parts[q] = s_q A_q
            moment = torch.einsum("qab,qr,ac,rcd->bd", parts, pair, moment, parts)
        v = into[v].src
    return float(moment.trace()) / _norm2(graph) - 1.0


def _draw(name: str, graph: LCG, config: VarianceConfig) -> tuple[Callable[[], Tensor], int]:
    """A draw of the estimate and the number of paths it averages."""
    if name.startswith("paths-"):
        mode = name.removeprefix("paths-")
        return (lambda: graph.sample_paths(config.paths, mode=mode)[0]), config.paths
    method = "project" if name == "inject-project" else "sample"
    at = _at(name, graph)
    return (lambda: graph.inject(config.keep, method=method, at=at).gradient[0]), 1


def _at(name: str, graph: LCG) -> list[int] | None:
    return [len(graph.vertices) - 2] if name == "inject-sample-last" else None  # the last tanh


def _exact(name: str, graph: LCG, config: VarianceConfig) -> float | None:
    if name.startswith("paths-"):
        return path_sampling_relvar(graph, name.removeprefix("paths-"))
    if name in ("inject-sample", "inject-sample-last"):
        return inject_relvar(graph, config.keep, _at(name, graph))
    return None


def study(config: VarianceConfig, progress: Callable[[str], None] | None = None) -> list[Row]:
    """Measure (and compute exactly, where possible) every estimator on both graphs, depths 1..max."""
    torch.manual_seed(config.seed)
    rows = []
    for kind in GRAPHS:
        for depth in range(1, config.max_depth + 1):
            graph = build(kind, depth, config.width, config.seed)
            exact = graph.gradient()[0]
            norm2 = _norm2(graph)
            n_paths = graph.count_paths()
            for name in ESTIMATORS:
                draw, paths = _draw(name, graph, config)
                errs = torch.tensor(
                    [float((draw() - exact).pow(2).sum()) * paths / norm2 for _ in range(config.reps)]
                )
                stored, total = 0, 0
                if name.startswith("inject"):
                    counts = graph.inject(config.keep, at=_at(name, graph))
                    stored, total = counts.stored, counts.exact
                se = float(errs.std()) / math.sqrt(config.reps)
                rows.append(Row(kind, depth, name, float(errs.mean()), se,
                                _exact(name, graph, config), n_paths, stored, total))
            if progress is not None:
                progress(f"{kind} depth {depth}")
    return rows
