"""RAD products of two tensors, matrix and elementwise: exact output, each operand's gradient from a
sketch of the other.

NOTE [Products of two activations]
    ``out = a @ b`` has the backward pass ``da = grad @ b^T`` and
    ``db = a^T @ grad``: each saved operand enters the other's gradient
    linearly, so an unbiased sketch of each gives unbiased ``da`` and ``db``.
    The two sketches are drawn independently (``a @ a^T`` included, where
    autograd sums the two terms into one gradient). An operand is saved only
    when the other one needs a gradient, and is kept exact, not sketched,
    when it is a parameter (trained or frozen) or a view of one such as
    ``weight.t()``, or a leaf that needs a gradient: its storage lives on
    anyway, so saving it costs nothing.
    This covers attention written with torch functions (Hugging Face's
    ``attn_implementation="eager"``): ``scores = q @ k^T`` saves sketches of
    ``q`` and ``k``, ``out = P @ v`` sketches of ``P`` and ``v``.

    Rows of a sketch run along an operand's last dimension, or along the one
    before it when that is the contiguous one (a transposed key), so that a
    sketch never copies the operand and every row gets its own scale.

    The elementwise product ``out = a * b`` is the same story with
    ``da = grad * b``, ``db = grad * a``: a gated MLP's
    ``act(gate(x)) * up(x)`` saves a sketch of each factor. An operand that
    broadcasts (a per-row scale, rotary embeddings' ``cos``) is smaller than
    the output and is saved as it is.

NOTE [A product's sketches serve the next layer]
    A gated MLP feeds ``x = a * b`` to its down projection, whose weight
    gradient ``grad^T x`` needs an estimate of ``x``. The product already
    saved independent sketches ``A`` of ``a`` and ``B`` of ``b`` for its own
    backward, and ``A * B`` is an unbiased estimate of ``x`` (the two are
    independent). So the layer saves nothing of its own and reads
    ``grad^T (A * B)``. No gradient multiplies one sketch by itself: the
    down projection's reads ``A`` and ``B`` once each; the gate's and the
    up projection's come through the product's backward, ``dx * B`` and
    ``dx * A``, where ``dx = grad W`` is exact. Quantized (every entry kept),
    it is also the better estimate: a product of two activations has heavy
    tails, and rounding it to 2 bits over its row's range is far noisier
    than rounding each factor over its own (a trained Llama's down
    projections: benchmarks/bench_gated_products.py). Sampled sketches are
    not reused (two samples of a tenth overlap on a hundredth). The layer
    finds them through its input's ``grad_fn``, the product's node, which
    holds them while the graph lives: eagerly, for the product's very
    output (a view or an in-place change has another node).
"""

from __future__ import annotations

import string

import math

import torch
from torch import Tensor

from radgrad.functional._base import (
    _DEFAULT, _RADFunction, _apply, _autocast_dtype, _check_config, _check_input, _lives_on, _packed, _sketch_from,
    _torch,
)
from radgrad.saved import save_for_backward, saved_tensors
from radgrad.sketch import Sketch, SketchConfig

__all__ = ["baddbmm", "einsum", "matmul", "mul"]


def _rows_view(t: Tensor) -> tuple[Tensor, bool]:
    """``t`` or its transpose, whichever runs contiguously along its last dimension; and whether transposed."""
    transposed = t.stride(-1) != 1 and t.stride(-2) == 1 and t.shape[-2] > 1
    return (t.mT if transposed else t), transposed


class _Matmul(_RADFunction):
    """``a @ b``, or ``beta * base + alpha * (a @ b)`` as ``torch.baddbmm`` computes it when ``base`` is given."""

    @staticmethod
    def forward(a, b, config, sketched, base=None, beta=1, alpha=1):
        output = torch.matmul(a, b) if base is None else torch.baddbmm(base, a, b, beta=beta, alpha=alpha)
        return _pack_operands(output, a, b, config, sketched, lambda t: _rows_view(t)[0])

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        ctx.transposed = [_rows_view(t)[1] for t in inputs[:2]]
        _save_operands(ctx, inputs, outputs, lambda t: _rows_view(t)[0])
        base, ctx.beta, ctx.alpha = (*inputs[4:], None, 1, 1)[:3]
        ctx.base_shape = None if base is None else base.shape

    @staticmethod
    def backward(ctx, grad, *_):
        a, b = (_estimate(t, transposed)
                for t, transposed in zip(saved_tensors(ctx, unpack=False), ctx.transposed))
        grad_a = grad_b = grad_base = None
        scaled = grad if ctx.alpha == 1 else grad * ctx.alpha
        if ctx.needs_input_grad[0]:
            grad_a = torch.matmul(scaled, b.mT).sum_to_size(ctx.shapes[0])
        if ctx.needs_input_grad[1]:
            grad_b = torch.matmul(a.mT, scaled).sum_to_size(ctx.shapes[1])
        given = len(ctx.needs_input_grad)  # 4 for a matmul, 7 with a base
        if given > 4 and ctx.needs_input_grad[4]:
            grad_base = (grad if ctx.beta == 1 else grad * ctx.beta).sum_to_size(ctx.base_shape)
        return (grad_a, grad_b, None, None, grad_base, None, None)[:given]


class _Einsum(_RADFunction):
    """``torch.einsum(equation, a, b)`` for an equation whose spelled-out form :func:`_einsum_specs` accepts
    (``specs``)."""

    @staticmethod
    def forward(a, b, config, sketched, equation, specs):
        return _pack_operands(torch.einsum(equation, a, b), a, b, config, sketched, _same)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        _save_operands(ctx, inputs, outputs, _same)
        ctx.specs = inputs[5]

    @staticmethod
    def backward(ctx, grad, *_):
        a, b = (_estimate(t, False) for t in saved_tensors(ctx, unpack=False))
        spec_a, spec_b, spec_out = ctx.specs
        # each operand's gradient is the product of the output's gradient with the other operand
        grad_a = torch.einsum(f"{spec_out},{spec_b}->{spec_a}", grad, b) if ctx.needs_input_grad[0] else None
        grad_b = torch.einsum(f"{spec_a},{spec_out}->{spec_b}", a, grad) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None, None, None, None


def _same(t: Tensor) -> Tensor:
    return t


def _spelled_out(equation: str, dims: tuple[int, int]) -> str | None:
    """``equation`` for two operands of ``dims`` dimensions, its output written out and its
    ellipsis spelled in unused letters, as torch reads it; None when it is not of that form.

    torch's implicit output is the ellipsis, then the subscripts used once, in
    alphabetical order (capitals first); an ellipsis stands for the same
    trailing dimensions, right-aligned, in every operand and in the output.
    """
    inputs, arrow, out = equation.replace(" ", "").partition("->")
    specs = inputs.split(",")
    if len(specs) != 2:
        return None
    if not arrow:
        out = ("..." if "..." in inputs else "") + "".join(
            sorted(c for c in set(inputs) if c.isalpha() and inputs.count(c) == 1))
    if "." not in inputs + out:
        return f"{specs[0]},{specs[1]}->{out}"
    if any(t.count(".") not in (0, 3) or t.count(".") != 3 * t.count("...") for t in (*specs, out)):
        return None
    counts = [dim - (len(spec) - 3) if "..." in spec else 0 for spec, dim in zip(specs, dims)]
    free = [c for c in string.ascii_letters if c not in inputs + out]
    if min(counts) < 0 or max(counts) > len(free):
        return None
    letters = "".join(free[:max(counts)])
    a, b = (spec.replace("...", letters[len(letters) - n:]) for spec, n in zip(specs, counts))
    return f"{a},{b}->{out.replace('...', letters)}"


def _einsum_specs(equation: str) -> tuple[str, str, str] | None:
    """The operand and output subscripts of a two-operand ``equation`` (spelled out: no ellipsis, an
    explicit output) whose gradients are einsums of the same kind, else None: no 0-dim operand, no
    subscript repeated within an operand or the output, and each operand's subscripts all in the
    other operand or the output."""
    inputs, arrow, out = equation.replace(" ", "").partition("->")
    specs = inputs.split(",")
    if not arrow or len(specs) != 2 or not all(s.isalpha() for s in (*specs, out) if s) \
            or not all(specs):  # a 0-dim operand: nothing worth sketching
        return None
    a, b = specs
    if any(len(set(s)) != len(s) for s in (a, b, out)) or not set(out) <= set(a) | set(b):
        return None
    if not (set(a) <= set(b) | set(out) and set(b) <= set(a) | set(out)):
        return None
    return a, b, out


def _pack_operands(output: Tensor, a: Tensor, b: Tensor, config: SketchConfig, sketched, rows) -> tuple:
    """``output`` tied to a sketch of ``rows(operand)`` for each ``sketched`` operand, then the
    sketches' tensors, three per operand (what :func:`_save_operands` reads)."""
    parts: list[Tensor | None] = []
    for t, sketch in zip((a, b), sketched):
        if sketch:
            view = rows(t)
            output, *more = _packed(output, view, config, max(view.dim() - 1, 0))
            parts += more
    return output, *parts


def _save_operands(ctx, inputs, outputs, rows) -> None:
    """Save for a product ``(a, b, config, sketched)`` each operand the other's gradient needs: the
    sketch of ``rows(operand)`` it returned (three outputs each, after the product) or the operand."""
    a, b, config, sketched = inputs[:4]
    parts = iter([outputs[1:][i:i + 3] for i in range(0, len(outputs) - 1, 3)])
    saved: list[Tensor | Sketch | None] = []
    needed = (ctx.needs_input_grad[1], ctx.needs_input_grad[0])  # a serves b's gradient, b serves a's
    for t, sketch, need in zip((a, b), sketched, needed):
        if sketch:
            view = rows(t)
            saved.append(_sketch_from(ctx, next(parts), view, config, max(view.dim() - 1, 0)))
        else:
            saved.append(t if need else None)
    ctx.shapes = (a.shape, b.shape)
    save_for_backward(ctx, *saved)


def _estimate(saved: Tensor | Sketch | None, transposed: bool) -> Tensor | None:
    if saved is None or isinstance(saved, Tensor):
        return saved
    estimate = saved.unpack()
    return estimate.mT if transposed else estimate


def matmul(a: Tensor, b: Tensor, config: SketchConfig = _DEFAULT) -> Tensor:
    """RAD ``torch.matmul`` of two tensors of at least two dimensions (batch dimensions broadcast).

    Exact: the output. Estimated (unbiased): the gradient of ``a`` from a
    sketch of ``b``, and that of ``b`` from an independent sketch of ``a``
    (NOTE [Products of two activations]); a parameter operand is saved as
    it is. With an exact config, no gradient needed, or an operand of fewer than
    two dimensions, ``torch.matmul`` runs unchanged.
    """
    _check_config("functional.matmul", config)
    _check_input("functional.matmul: a", a)
    _check_input("functional.matmul: b", b)
    need_a, need_b = a.requires_grad, b.requires_grad
    if config.exact or not ((need_a or need_b) and torch.is_grad_enabled()) or a.dim() < 2 or b.dim() < 2:
        return _torch(torch.matmul, a, b)
    sketched = (need_b and not _lives_on(a), need_a and not _lives_on(b))
    if not any(sketched):
        return _torch(torch.matmul, a, b)
    return _apply(lambda a, b, _, config: _Matmul.run(a, b, config, sketched), a, b, None, config)[0]


def einsum(equation: str, a: Tensor, b: Tensor, config: SketchConfig = _DEFAULT) -> Tensor:
    """RAD ``torch.einsum`` of two tensors.

    Exact: the output (torch's own einsum). Estimated (unbiased): the
    gradient of ``a`` from a sketch of ``b`` and that of ``b`` from an
    independent sketch of ``a``, as for :func:`matmul`; a parameter operand
    is saved as it is. An implicit output (no ``->``) and an ellipsis are
    read as torch reads them. Runs ``torch.einsum`` unchanged with an exact
    config, no gradient needed, a subscript repeated within an operand (a
    diagonal), one summed within a single operand, operands whose shared
    subscripts or ellipsis dimensions differ in size (broadcast) or of two
    dtypes, or under autocast.
    """
    _check_config("functional.einsum", config)
    _check_input("functional.einsum: a", a)
    _check_input("functional.einsum: b", b)
    need_a, need_b = a.requires_grad, b.requires_grad
    spelled = _spelled_out(equation, (a.dim(), b.dim())) if isinstance(equation, str) else None
    specs = _einsum_specs(spelled) if spelled is not None else None
    if config.exact or not ((need_a or need_b) and torch.is_grad_enabled()) or specs is None \
            or _autocast_dtype(a.device.type) is not None or a.dtype != b.dtype \
            or len(specs[0]) != a.dim() or len(specs[1]) != b.dim() \
            or any(a.shape[specs[0].index(c)] != b.shape[specs[1].index(c)] for c in set(specs[0]) & set(specs[1])):
        return _torch(torch.einsum, equation, a, b)
    sketched = (need_b and not _lives_on(a), need_a and not _lives_on(b))
    if not any(sketched):
        return _torch(torch.einsum, equation, a, b)
    return _Einsum.run(a, b, config, sketched, equation, specs)[0]


def baddbmm(input: Tensor, batch1: Tensor, batch2: Tensor, beta: float = 1, alpha: float = 1,
            config: SketchConfig = _DEFAULT) -> Tensor:
    """RAD ``torch.baddbmm``: ``beta * input + alpha * (batch1 @ batch2)`` for batches of matrices.

    Exact: the output (torch's own ``baddbmm``) and the gradient of
    ``input``. Estimated (unbiased): the gradient of ``batch1`` from a sketch
    of ``batch2`` and that of ``batch2`` from an independent sketch of
    ``batch1``, as for :func:`matmul`. Bloom adds its position biases to its
    attention scores this way. With an exact config, no product operand
    needing a gradient, or nothing to sketch, ``torch.baddbmm`` runs unchanged.
    """
    _check_config("functional.baddbmm", config)
    for name, t in (("input", input), ("batch1", batch1), ("batch2", batch2)):
        _check_input(f"functional.baddbmm: {name}", t)
    need_a, need_b = batch1.requires_grad, batch2.requires_grad
    if config.exact or not ((need_a or need_b) and torch.is_grad_enabled()) or batch1.dim() != 3:
        return _torch(torch.baddbmm, input, batch1, batch2, beta=beta, alpha=alpha)
    sketched = (need_b and not _lives_on(batch1), need_a and not _lives_on(batch2))
    if not any(sketched):
        return _torch(torch.baddbmm, input, batch1, batch2, beta=beta, alpha=alpha)
    return _apply(lambda a, b, base, config: _Matmul.run(a, b, config, sketched, base, beta, alpha),
                  batch1, batch2, input, config)[0]


class _Mul(_RADFunction):
    @staticmethod
    def forward(a, b, config, sketched):
        return _pack_operands(torch.mul(a, b), a, b, config, sketched, lambda t: t)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        _save_operands(ctx, inputs, outputs, lambda t: t)
        # both factors quantized: a linear layer fed the product may read them (eagerly, where ctx
        # is the output's grad_fn)
        ctx.radgrad_factors = all(inputs[3]) and inputs[2].method == "quantize"

    @staticmethod
    def backward(ctx, grad, *_):
        a, b = (_estimate(t, False) for t in saved_tensors(ctx, unpack=False))
        grad_a = (grad * b).sum_to_size(ctx.shapes[0]) if ctx.needs_input_grad[0] else None
        grad_b = (grad * a).sum_to_size(ctx.shapes[1]) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None, None


def mul(a: Tensor, b: Tensor, config: SketchConfig = _DEFAULT) -> Tensor:
    """RAD ``torch.mul`` of two tensors (broadcasting as torch does).

    Exact: the output. Estimated (unbiased): the gradient of ``a`` from a
    sketch of ``b`` and that of ``b`` from an independent sketch of ``a``
    (NOTE [Products of two activations]). An operand is sketched only when
    the other needs a gradient and it is as large as the output and not a
    parameter or a leaf that needs a gradient; otherwise it is saved as it
    is. With an exact config, no gradient needed, nothing to sketch, operands
    of two dtypes, or a 0-dim or empty output, ``torch.mul`` runs unchanged.
    """
    _check_config("functional.mul", config)
    _check_input("functional.mul: a", a)
    _check_input("functional.mul: b", b)
    need_a, need_b = a.requires_grad, b.requires_grad
    if config.exact or not ((need_a or need_b) and torch.is_grad_enabled()):
        return _torch(torch.mul, a, b)
    shape = torch.broadcast_shapes(a.shape, b.shape)
    sketched = (need_b and a.shape == shape and not _lives_on(a),
                need_a and b.shape == shape and not _lives_on(b))
    if not any(sketched) or a.dtype != b.dtype or len(shape) == 0 or math.prod(shape) == 0:
        return _torch(torch.mul, a, b)
    return _Mul.run(a, b, config, sketched)[0]  # autocast leaves mul alone: so does this


def product_sketches(t: Tensor) -> tuple[Sketch, Sketch] | None:
    """The sketches of the two factors of ``t``, if ``t`` is itself the output of :func:`mul` with both
    factors quantized, read from the product's backward node (NOTE [A product's sketches serve the
    next layer]); else None."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return None
    node = t.grad_fn
    if not getattr(node, "radgrad_factors", False):
        return None
    with torch.no_grad():  # read, not unpacked: no second derivative is built from them
        a, b = saved_tensors(node, unpack=False)
    return a, b
