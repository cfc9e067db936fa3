"""The estimators: pack a tensor into compact storage, unpack an unbiased estimate.

Every RAD op in radgrad (the layers, the recurrence, the LCG injections,
user ops) stores its saved activations through :func:`pack` and reads them
back through :func:`unpack`. The random numbers come from :mod:`radgrad.rng`.

NOTE [Sketch layout]
    A tensor ``x`` is viewed as a matrix of ``rows x D``: its first
    ``batch_dims`` dimensions index rows, the remaining ones are flattened into
    the ``D`` entries of a row. A linear layer's input ``(B, ..., F)`` has
    ``batch_dims = x.dim() - 1`` (one row per example and position), a
    convolution's input ``(B, C, H, W)`` has ``batch_dims = 2`` (one row per
    example and channel, ``D = H * W`` spatial positions), a single state has
    ``batch_dims = 0`` (one row). Any strides are accepted; nothing is copied
    unless the row dimensions cannot be merged into one.

NOTE [Sampling with shared offsets]
    ``method="sample"`` keeps ``k = max(1, round(keep * D))`` entries of each
    row and scales them by ``D / k``. Entry ``s`` of row ``r`` is taken at
    index ``i[r, s] = (a[r] + o[s]) mod D``, where the row bases ``a`` and the
    offsets ``o`` are independent and uniform on ``[0, D)``. Every ``i[r, s]``
    is uniform, and any two of them are independent: for ``r != r'`` through
    ``a``, for two entries of one row through ``o`` (``(a + o[s], a + o[t])``
    is a shift of the independent pair ``(o[s], o[t])``). Both the mean and the
    covariance of the estimate depend only on single indices and pairs, so
    they equal those of the paper's estimator, which draws all ``rows x k``
    indices independently with replacement: the estimate is unbiased with the
    very same variance. What is stored is ``rows + k`` small integers instead
    of ``rows x k``, and building the indices takes an addition and a
    wrap-around, not a hash or a division. ``per_example=False`` uses one row
    base for all rows: every row keeps the same entries.

NOTE [Projection]
    ``method="project"`` stores ``x S`` for a ``D x k`` matrix ``S`` of random
    signs and returns ``(x S) S^T / k``; ``E[S S^T] / k = I``. Only a 64-bit
    seed is stored; the signs are rebuilt from it (NOTE [Counter-based signs]
    in :mod:`radgrad.rng`). ``per_example=True`` draws a matrix per row.

Exact: the forward value of every op (nothing here touches it), ``keep=1``
and rows short enough that ``k == D`` (the tensor itself is stored, unchanged). Estimated: ``unpack(pack(x))`` for
``keep < 1``, unbiased for every method and ``per_example`` setting.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from radgrad import rng

__all__ = ["METHODS", "SketchConfig", "Sketch", "draw", "pack", "unpack"]

#: Names of the estimators, each with a one-line description (the CLI shows these).
METHODS: dict[str, str] = {
    "sample": "keep k of D entries of each row at uniform random positions, rescaled by D/k",
    "project": "store a random Rademacher projection x S and return (x S) S^T / k",
}

# Largest number of sign entries generated at once by a per-example projection.
_PROJECT_CHUNK = 2**22
# Rows of up to this many entries: indices and row bases fit an int32.
_MAX_WIDTH = 2**31 - 1


def _real(name: str, value: object) -> float:
    """``value`` as a float if it is a real number (Python, numpy, or a one-element tensor)."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_complex \
            and value.dtype != torch.bool:
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"radgrad: {name} must be a real number in (0, 1], got {value!r}")


@dataclass(frozen=True)
class SketchConfig:
    """How a RAD op stores a tensor for the backward pass.

    Args:
        keep: fraction of each row's entries kept, in (0, 1]: a Python, numpy
            or one-element tensor number. ``1.0`` stores the tensor itself and
            gives exact gradients.
        method: ``"sample"`` or ``"project"`` (see :data:`METHODS`).
        per_example: independent randomness for every row (``True``, the
            paper's "different sample") or one draw shared by all rows
            (``False``, "same sample").

    Raises:
        ValueError: ``keep`` outside (0, 1] or not finite, or an unknown ``method``.
        TypeError: ``keep`` not a real number, ``method`` not a string or
            ``per_example`` not a bool.
    """

    keep: float = 0.1
    method: str = "sample"
    per_example: bool = True

    def __post_init__(self) -> None:
        keep = _real("keep", self.keep)
        if not math.isfinite(keep) or not 0.0 < keep <= 1.0:
            raise ValueError(f"radgrad: keep must be in (0, 1] and finite, got {self.keep!r}")
        object.__setattr__(self, "keep", keep)
        # NOTE [keep under torch.compile]: torch.compile turns a float it sees
        # change between calls into a symbol (torch 2.13 does not specialize
        # floats), and k = round(keep * D) from a float symbol cannot size a draw.
        # A str is always a compile-time constant (guarded by equality), so the
        # traced code reads keep from its exact repr.
        object.__setattr__(self, "_keep_text", repr(keep))
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(
                f"radgrad: method must be one of {sorted(METHODS)}, got {self.method!r}"
            )
        if not isinstance(self.per_example, bool):
            raise TypeError(f"radgrad: per_example must be True or False, got {self.per_example!r}")

    @property
    def exact(self) -> bool:
        """True when nothing is randomized (``keep == 1``)."""
        return self._keep_text == "1.0"

    def kept(self, d: int) -> int:
        """Number of values kept from a row of ``d`` entries."""
        return max(1, round(float(self._keep_text) * d))


class Sketch:
    """A packed tensor: the kept values plus the random draw needed to rebuild the rest.

    ``values`` and ``state`` are tensors; an autograd function saves both
    through :func:`radgrad.save_for_backward`. ``state`` holds the row bases
    and offsets of ``"sample"`` (NOTE [Sampling with shared offsets]) or the
    seed of ``"project"``. When nothing is randomized (``keep == 1``, or
    ``k == D``: keeping every entry of a row costs as much as the row, so
    it is stored exactly, e.g. a row of one entry) ``values`` is the
    original tensor and ``state`` is ``None``. (A plain slotted class rather than a
    dataclass: one is built on every forward and backward of every RAD op.)
    """

    __slots__ = ("values", "state", "shape", "batch_dims", "config")

    def __init__(self, values: Tensor | None, state: Tensor | None, shape: torch.Size,
                 batch_dims: int, config: SketchConfig) -> None:
        self.values, self.state, self.shape = values, state, shape
        self.batch_dims, self.config = batch_dims, config

    def unpack(self) -> Tensor:
        return unpack(self)

    def __repr__(self) -> str:
        return f"Sketch(shape={tuple(self.shape)}, batch_dims={self.batch_dims}, config={self.config})"


def draw(x: Tensor, config: SketchConfig, *, batch_dims: int,
         generator: torch.Generator | None = None) -> Tensor | None:
    """The random draw :func:`pack` makes for ``x``, or ``None`` when nothing is randomized.

    Drawing apart from packing lets an op draw before its forward computation
    and tie its output to the draw (:func:`radgrad.tie`), as the built-in ops
    do; ``pack(x, ..., state=draw(x, ...))`` is ``pack(x, ...)``.
    """
    _check(x, batch_dims)
    rows, d = _rows_and_width(x.shape, batch_dims)
    k = config.kept(d)
    if config.exact or k >= d or rows == 0:
        return None
    if d > _MAX_WIDTH:
        raise ValueError(f"radgrad: rows of at most 2**31 - 1 entries can be sketched, got {d}")
    if config.method == "sample":
        return rng.draw(0, d, ((rows if config.per_example else 1) + k,), _index_dtype(d), x, generator)
    return rng.draw_seed(x, generator)


def pack(
    x: Tensor, config: SketchConfig, *, batch_dims: int, generator: torch.Generator | None = None,
    state: Tensor | None = None,
) -> Sketch:
    """Pack ``x`` into a :class:`Sketch` whose :func:`unpack` is an unbiased estimate of ``x``.

    Args:
        x: a floating-point tensor, of any strides and device.
        config: keep fraction, method and per-example setting.
        batch_dims: how many leading dimensions index rows (NOTE [Sketch layout]).
        generator: draw from this generator instead of torch's default
            generator of ``x``'s device.
        state: use this draw instead of drawing: the ``state`` of another
            sketch made with the same config from a tensor of the same shape
            and ``batch_dims`` (both estimates then keep the same positions or
            use the same signs), or what :func:`draw` returned for ``x``.

    Returns:
        A Sketch holding ``rows x k`` kept values (``k = max(1, round(keep * D))``)
        and its random draw; for ``keep == 1``, for ``k == D`` and for an
        empty tensor it holds ``x`` itself (exact, nothing drawn).

    Raises:
        TypeError: ``x`` is not a floating-point tensor.
        ValueError: ``batch_dims`` is not between 0 and ``x.dim()``, a row has
            more than 2**31 - 1 entries, or ``state`` does not fit.
    """
    if state is None:
        state = draw(x, config, batch_dims=batch_dims, generator=generator)
    else:
        _check(x, batch_dims)
    if state is None or config.exact:
        return Sketch(x, None, x.shape, batch_dims, config)
    rows, d = _rows_and_width(x.shape, batch_dims)
    k = config.kept(d)
    _check_state(state, config, rows, k)
    if config.method == "sample":
        xr = _as_rows(x, batch_dims)
        idx = _indices(state, k, d)
        if config.per_example:
            values = xr.gather(-1, idx.view(*xr.shape[:-1], k))
        else:
            values = xr.index_select(-1, idx[0])
        return Sketch(values.reshape(rows, k), state, x.shape, batch_dims, config)
    xr = x.reshape(rows, d)
    if config.per_example:
        values = torch.cat([torch.bmm(xr[lo:hi].unsqueeze(1), signs).squeeze(1)
                            for lo, hi, signs in _sign_chunks(state, rows, d, k, x.dtype)])
    else:
        values = xr @ rng.signs(state, 0, (d, k), x.dtype)
    return Sketch(values, state, x.shape, batch_dims, config)


def unpack(sketch: Sketch) -> Tensor:
    """The unbiased estimate of the packed tensor, with its original shape.

    For a randomized sketch the result is a new tensor; otherwise it is the
    packed tensor itself.
    """
    config, values = sketch.config, sketch.values
    if sketch.state is None:
        return values
    rows, d = _rows_and_width(sketch.shape, sketch.batch_dims)
    k = values.shape[1]
    if config.method == "sample":
        idx = _indices(sketch.state, k, d).expand(rows, k)
        est = values.new_zeros(rows, d).scatter_add_(1, idx, values * (d / k))
    elif config.per_example:
        est = torch.cat([torch.bmm(values[lo:hi].unsqueeze(1), signs.transpose(1, 2)).squeeze(1)
                         for lo, hi, signs in _sign_chunks(sketch.state, rows, d, k, values.dtype)])
        est = est.mul_(1.0 / k)
    else:
        est = (values @ rng.signs(sketch.state, 0, (d, k), values.dtype).t()).mul_(1.0 / k)
    return est.view(sketch.shape)


def _check(x: Tensor, batch_dims: int) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"radgrad: can only sketch floating-point tensors, got {got}")
    if isinstance(batch_dims, bool) or not isinstance(batch_dims, int) or not 0 <= batch_dims <= x.dim():
        raise ValueError(
            f"radgrad: batch_dims must be an int in [0, {x.dim()}] for a tensor of shape "
            f"{tuple(x.shape)}, got {batch_dims!r}"
        )


def _check_state(state: Tensor, config: SketchConfig, rows: int, k: int) -> None:
    if config.method == "sample":
        shape = ((rows if config.per_example else 1) + k,)
        ok = state.shape == shape and not state.is_floating_point()
    else:
        shape = ()
        ok = state.shape == shape and state.dtype == torch.int64
    if not ok:
        raise ValueError(
            f"radgrad: state must be the draw of a sketch with the same config, shape and batch_dims "
            f"(an integer tensor of shape {shape}), got {state.dtype} of shape {tuple(state.shape)}"
        )


def _rows_and_width(shape: torch.Size, batch_dims: int) -> tuple[int, int]:
    return math.prod(shape[:batch_dims]), math.prod(shape[batch_dims:])


def _as_rows(x: Tensor, batch_dims: int) -> Tensor:
    """``x`` as ``(*batch, D)``: a view whenever the row dimensions merge (channels_last does)."""
    if batch_dims == 0:
        return x.reshape(1, -1)
    return x.flatten(batch_dims) if batch_dims < x.dim() else x.unsqueeze(-1)


def _index_dtype(d: int) -> torch.dtype:
    return torch.int16 if d <= 2**15 else torch.int32


def _indices(state: Tensor, k: int, d: int) -> Tensor:
    """The ``(rows, k)`` (per example) or ``(1, k)`` (shared) sampled indices of a sample state."""
    # (a + o) mod D as t = a + (o - D) in [-D, D), plus D where t < 0: int32 shifts
    # and adds, several times faster on a CPU than a comparison or a remainder.
    state = state.int()
    t = state[:-k, None] + (state[-k:] - d)
    return t.add_(t.bitwise_right_shift(31).bitwise_and_(d)).long()


def _sign_chunks(seed: Tensor, rows: int, d: int, k: int, dtype: torch.dtype):
    """Yield (lo, hi, signs) with independent ``(hi-lo, d, k)`` sign matrices, in a fixed order."""
    step = max(1, _PROJECT_CHUNK // (d * k))
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        yield lo, hi, rng.signs(seed, lo * d * k, (hi - lo, d, k), dtype)
