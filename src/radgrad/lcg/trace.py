"""Build the LCG of a PyTorch function by tracing it to aten ops with ``make_fx``.

``make_fx`` (from ``torch.fx.experimental.proxy_tensor``) runs the function on
the real inputs and records the aten ops it dispatches (``torch.matmul``
arrives as ``mm``/``mv``/``dot``, views as ``view``/``unsqueeze``/...). The
recorded graph is then replayed op by op on the same inputs; every value that
depends on an input becomes a vertex and gets one edge per input-dependent
argument, with the local Jacobian of :data:`RULES`. Values that do not depend
on an input (``torch.ones(...)`` inside the function, ``detach``) are constants
folded into the Jacobians. Vertices that do not reach the output are dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch import Tensor
from torch.fx.experimental.proxy_tensor import make_fx

from radgrad.lcg.graph import LCG, Edge, Vertex
from radgrad.lcg.jacobians import Elementwise, LocalJacobian, MatMul, Permute, Reduce, Reshape

__all__ = ["trace", "RULES"]

aten = torch.ops.aten

# A rule maps (argument values, keyword values, output value) to the local
# Jacobian of the output w.r.t. each tensor argument position it applies to.
Rule = Callable[[Sequence[Any], dict[str, Any], Tensor], dict[int, LocalJacobian]]


def _diag(d: Tensor | float, arg: Tensor, out: Tensor) -> Elementwise:
    if isinstance(d, Tensor):
        d = torch.broadcast_to(d, out.shape).to(out.dtype).contiguous()
    else:
        d = float(d)
    return Elementwise(d, arg.shape, out.shape, out.dtype)


def _binary(da: Callable, db: Callable) -> Rule:
    """Rule of an elementwise binary op from its partial derivatives ``da(a, b, out, alpha)``."""

    def rule(args, kwargs, out):
        a, b = args[0], args[1]
        alpha = float(kwargs.get("alpha", args[2] if len(args) > 2 else 1))
        jac = {}
        if isinstance(a, Tensor):
            jac[0] = _diag(da(a, b, out, alpha), a, out)
        if isinstance(b, Tensor):
            jac[1] = _diag(db(a, b, out, alpha), b, out)
        return jac

    return rule


def _unary(d: Callable[[Tensor, Tensor], Tensor | float]) -> Rule:
    return lambda args, kwargs, out: {0: _diag(d(args[0], out), args[0], out)}


def _reduce(mean: bool) -> Rule:
    def rule(args, kwargs, out):
        a = args[0]
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        keepdim = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
        if not dims:  # None or [] reduce every dimension
            dims = range(a.dim())
        dims = tuple(sorted({d % max(a.dim(), 1) for d in dims}))
        count = math.prod(a.shape[d] for d in dims) if a.dim() else 1
        scale = 1.0 / count if mean else 1.0
        return {0: Reduce(a.shape, out.shape, dims, keepdim, scale, out.dtype)}

    return rule


def _reshape(args, kwargs, out) -> dict[int, LocalJacobian]:
    return {0: Reshape(args[0].shape, out.shape, out.dtype)}


def _permute(perm_of: Callable[[Tensor, Sequence[Any]], list[int]]) -> Rule:
    def rule(args, kwargs, out):
        a = args[0]
        return {0: Permute(a.shape, out.shape, tuple(perm_of(a, args)), out.dtype)}

    return rule


def _swap(n: int, d0: int, d1: int) -> list[int]:
    perm = list(range(n))
    if n:
        perm[d0 % n], perm[d1 % n] = perm[d1 % n], perm[d0 % n]
    return perm


def _matmul(args, kwargs, out) -> dict[int, LocalJacobian]:
    a, b = args[0], args[1]
    return {
        0: MatMul(b, True, a.shape, out.shape),
        1: MatMul(a, False, b.shape, out.shape),
    }


def _expand(args, kwargs, out) -> dict[int, LocalJacobian]:
    return {0: _diag(1.0, args[0], out)}


_ELEMENTWISE: dict[Any, Rule] = {
    aten.add: _binary(lambda a, b, out, alpha: 1.0, lambda a, b, out, alpha: alpha),
    aten.sub: _binary(lambda a, b, out, alpha: 1.0, lambda a, b, out, alpha: -alpha),
    aten.rsub: _binary(lambda a, b, out, alpha: -alpha, lambda a, b, out, alpha: 1.0),
    aten.mul: _binary(lambda a, b, out, alpha: b, lambda a, b, out, alpha: a),
    aten.div: _binary(lambda a, b, out, alpha: 1.0 / b, lambda a, b, out, alpha: -out / b),
    aten.neg: _unary(lambda a, out: -1.0),
    aten.tanh: _unary(lambda a, out: 1.0 - out * out),
    aten.relu: _unary(lambda a, out: (a > 0).to(out.dtype)),
    aten.exp: _unary(lambda a, out: out),
    aten.sigmoid: _unary(lambda a, out: out * (1.0 - out)),
}
_SHAPES: dict[Any, Rule] = {
    **dict.fromkeys(
        [aten.view, aten._unsafe_view, aten.reshape, aten.view_copy, aten.clone, aten.alias,
         aten.contiguous, aten.unsqueeze, aten.unsqueeze_, aten.unsqueeze_copy,
         aten.squeeze, aten.squeeze_, aten.squeeze_copy],
        _reshape,
    ),
    **dict.fromkeys(
        [aten.t, aten.t_, aten.t_copy],
        _permute(lambda a, args: list(range(a.dim()))[::-1]),
    ),
    **dict.fromkeys(
        [aten.transpose, aten.transpose_, aten.transpose_copy],
        _permute(lambda a, args: _swap(a.dim(), args[1], args[2])),
    ),
    **dict.fromkeys(
        [aten.permute, aten.permute_copy],
        _permute(lambda a, args: [d % max(a.dim(), 1) for d in args[1]]),
    ),
    **dict.fromkeys([aten.expand, aten.expand_copy], _expand),
}

#: Local-Jacobian rule of every supported aten op (by overload packet).
RULES: dict[Any, Rule] = {
    **_ELEMENTWISE,
    **_SHAPES,
    **dict.fromkeys([aten.mm, aten.mv, aten.dot, aten.bmm], _matmul),
    aten.sum: _reduce(mean=False),
    aten.mean: _reduce(mean=True),
}

# Ops whose result is treated as a constant even when an argument depends on an input.
_CONSTANT = {aten.detach, aten.lift_fresh_copy}
# In-place view ops make_fx may record (matmul's decomposition uses squeeze_);
# they are replayed out of place so recorded values are never mutated.
_OUT_OF_PLACE = {aten.squeeze_: aten.squeeze, aten.unsqueeze_: aten.unsqueeze,
                 aten.t_: aten.t, aten.transpose_: aten.transpose}


def trace(fn: Callable[..., Tensor], *inputs: Tensor, cotangent: Tensor | None = None) -> LCG:
    """Trace ``fn(*inputs)`` and return its linearized computational graph.

    The graph computes gradients of ``<cotangent, fn(*inputs)>`` with respect
    to every input (``cotangent`` defaults to ones, i.e. the gradient of
    ``fn(*inputs).sum()``). The forward values are exact; nothing is randomized
    here.

    Args:
        fn: a function of the tensors ``inputs`` returning one tensor.
        inputs: floating-point tensors; one graph vertex each.
        cotangent: optional tensor of the output's shape.

    Raises:
        TypeError: no inputs, a non floating-point input, or ``fn`` not returning one tensor.
        ValueError: the output does not depend on an input, or the cotangent shape is wrong.
        NotImplementedError: an op on an input-dependent value has no local-Jacobian rule.
    """
    if not inputs:
        raise TypeError("radgrad.lcg: trace needs at least one input tensor")
    for i, x in enumerate(inputs):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"radgrad.lcg: input {i} must be a floating-point tensor, got {got}")
    inputs = tuple(x.detach() for x in inputs)
    module = make_fx(fn)(*inputs)
    return _Builder(module, inputs).build(cotangent)


class _Builder:
    """Replays a ``make_fx`` graph on real values and collects vertices and edges."""

    def __init__(self, module: torch.fx.GraphModule, inputs: tuple[Tensor, ...]) -> None:
        self.module = module
        self.inputs = inputs
        self.values: dict[torch.fx.Node, Any] = {}
        self.vertex: dict[torch.fx.Node, int] = {}
        self.vertices: list[Vertex] = []
        self.edges: list[Edge] = []

    def build(self, cotangent: Tensor | None) -> LCG:
        placeholders = iter(self.inputs)
        output_node = None
        for node in self.module.graph.nodes:
            if node.op == "placeholder":
                self._add_vertex(node, "input", next(placeholders))
            elif node.op == "get_attr":
                self.values[node] = getattr(self.module, node.target)
            elif node.op == "call_function":
                self._call(node)
            elif node.op == "output":
                output_node = node.args[0]
        if not isinstance(output_node, torch.fx.Node) or not isinstance(
            self.values.get(output_node), Tensor
        ):
            raise TypeError("radgrad.lcg: fn must return a single tensor")
        if output_node not in self.vertex:
            raise ValueError("radgrad.lcg: the output of fn does not depend on any input")
        output = self.vertex[output_node]
        out_value = self.vertices[output].value
        if cotangent is None:
            cotangent = torch.ones_like(out_value)
        elif not isinstance(cotangent, Tensor) or cotangent.shape != out_value.shape:
            got = tuple(cotangent.shape) if isinstance(cotangent, Tensor) else type(cotangent).__name__
            raise ValueError(
                f"radgrad.lcg: cotangent must be a tensor of the output's shape "
                f"{tuple(out_value.shape)}, got {got}"
            )
        return self._pruned(output, cotangent.detach().to(out_value.dtype))

    def _add_vertex(self, node: torch.fx.Node, op: str, value: Tensor) -> int:
        self.values[node] = value
        self.vertex[node] = len(self.vertices)
        self.vertices.append(Vertex(node.name, op, value))
        return self.vertex[node]

    def _call(self, node: torch.fx.Node) -> None:
        target = node.target
        packet = getattr(target, "overloadpacket", target)
        args = torch.fx.node.map_arg(node.args, self.values.__getitem__)
        kwargs = torch.fx.node.map_arg(node.kwargs, self.values.__getitem__)
        if packet in _OUT_OF_PLACE:
            target = getattr(_OUT_OF_PLACE[packet], target._overloadname)
        value = target(*args, **kwargs)
        depends = [n for n in node.all_input_nodes if n in self.vertex]
        differentiable = isinstance(value, Tensor) and value.is_floating_point()
        if not depends or not differentiable or packet in _CONSTANT:
            # Constants, and integer/boolean results (no derivative flows through them).
            self.values[node] = value
            return
        rule = RULES.get(packet)
        sources = [i for i, a in enumerate(node.args) if isinstance(a, torch.fx.Node) and a in self.vertex]
        if rule is None or {node.args[i] for i in sources} != set(depends):
            supported = ", ".join(sorted(str(p).removeprefix("aten.") for p in RULES))
            raise NotImplementedError(
                f"radgrad.lcg: no local Jacobian for {target} (node {node.name!r}); "
                f"supported aten ops: {supported}"
            )
        jacobians = rule(args, kwargs, value)
        v = self._add_vertex(node, str(packet).removeprefix("aten."), value)
        for i in sources:
            self.edges.append(Edge(self.vertex[node.args[i]], v, jacobians[i]))

    def _pruned(self, output: int, cotangent: Tensor) -> LCG:
        """Keep the inputs and the vertices that reach the output; renumber."""
        inputs = [self.vertex[n] for n in self.module.graph.nodes if n.op == "placeholder"]
        reaches = {output}
        for edge in reversed(self.edges):  # edges were added in topological order
            if edge.dst in reaches:
                reaches.add(edge.src)
        keep = sorted(reaches | set(inputs))
        new = {old: i for i, old in enumerate(keep)}
        edges = tuple(
            Edge(new[e.src], new[e.dst], e.jacobian) for e in self.edges if e.dst in reaches
        )
        return LCG(
            tuple(self.vertices[i] for i in keep),
            edges,
            tuple(new[i] for i in inputs),
            new[output],
            cotangent,
        )
