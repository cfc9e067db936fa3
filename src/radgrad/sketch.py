"""The estimators' one interface: pack a tensor into compact storage, unpack an unbiased estimate.

Every RAD op in radgrad (the layers, the recurrence, the LCG injections,
user ops) stores its saved activations through :func:`pack` and reads them
back through :func:`unpack`. The schemes themselves live in
:mod:`radgrad.estimators`; the random numbers come from :mod:`radgrad.rng`.

NOTE [Sketch layout]
    A tensor ``x`` is viewed as a matrix of ``rows x D``: its first
    ``batch_dims`` dimensions index rows, the remaining ones are flattened into
    the ``D`` entries of a row. A linear layer's input ``(B, ..., F)`` has
    ``batch_dims = x.dim() - 1`` (one row per example and position), a
    convolution's input ``(B, C, H, W)`` has ``batch_dims = 2`` (one row per
    example and channel, ``D = H * W`` spatial positions), a single state has
    ``batch_dims = 0`` (one row). Any strides are accepted; nothing is copied
    unless the row dimensions cannot be merged into one. Quantization scales
    are kept per row, or per group of consecutive rows when rows are short
    (NOTE [Stochastic rounding] in :mod:`radgrad.estimators.quantize`).

NOTE [What a sketch stores]
    ``method`` chooses which values of a row are kept: ``"sample"`` ``k`` at
    uniform positions (rescaled by ``D / k``), ``"norm"`` ``k`` drawn in
    proportion to magnitude, ``"project"`` ``k`` random sign projections,
    ``"quantize"`` all ``D``. ``k = max(1, round(keep * D))``. ``bits``
    then stores those values as ``bits``-bit codes by unbiased stochastic
    rounding, with a per-row offset and step; ``bits=None`` stores them in
    the tensor's dtype. Every combination is unbiased: the positions (or
    signs) and the rounding are independent, and each is unbiased given the
    other. Keeping every entry in full precision (``keep=1``, or ``k == D``
    without ``bits``) stores the tensor itself: exact.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from radgrad import rng
from radgrad.estimators import norm, project, quantize, sample

__all__ = ["METHODS", "BITS", "SketchConfig", "Sketch", "draw", "pack", "pack_copies", "unpack", "unpack_rows", "tie"]

#: Names of the estimators, each with a one-line description (the CLI shows these).
METHODS: dict[str, str] = {
    "sample": "keep k of D entries of each row at uniform random positions, rescaled by D/k",
    "norm": "keep k draws per row, entry j with probability |x_j| / ||x||_1, positions stored",
    "project": "store a random Rademacher projection x S and return (x S) S^T / k",
    "quantize": "keep every entry, stochastically rounded to `bits` bits with a per-row (or per-group-of-short-rows) scale",
}
BITS = quantize.BITS
#: The bits of ``method="quantize"`` when none are given.
DEFAULT_QUANTIZE_BITS = 2
#: The bits of softmax's saved output under ``method="quantize"`` when no ``bits`` are given
#: (NOTE [Softmax from two sketches] in :mod:`radgrad.functional`).
DEFAULT_SOFTMAX_BITS = 4
_DEFAULT_KEEP = 0.1
# Rows of up to this many entries: indices and row bases fit an int32.
_MAX_WIDTH = 2**31 - 1


def _bits(name: str, value: object) -> int | None:
    """``value`` as an int of :data:`BITS`, or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"radgrad: {name} must be an int in {BITS} or None, got {value!r}")
    if int(value) not in BITS:
        raise ValueError(f"radgrad: {name} must be one of {BITS} or None, got {value!r}")
    return int(value)


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
    """How a RAD op stores a tensor for the backward pass (NOTE [What a sketch stores]).

    Args:
        keep: fraction of each row's entries kept, in (0, 1]: a Python, numpy
            or one-element tensor number. ``None`` (the default) means 0.1,
            or 1 for ``method="quantize"``, which keeps every entry and takes
            no other keep. ``keep=1`` without ``bits`` stores the tensor
            itself and gives exact gradients.
        method: ``"sample"``, ``"norm"``, ``"project"`` or ``"quantize"`` (see :data:`METHODS`).
        per_example: independent positions or signs for every row (``True``,
            the paper's "different sample") or one draw shared by all rows
            (``False``, "same sample"; not for ``"norm"``, whose positions
            follow each row's values). Rounding is always per entry.
        bits: store the kept values as codes of 1, 2, 4 or 8 bits (unbiased
            stochastic rounding, per-row scale), or ``None`` for the tensor's
            own dtype. ``method="quantize"`` defaults to 2 bits.
        softmax_bits: the bits of softmax's two sketches of its output, whose
            backward multiplies them: ``None`` (the default) means 4 for
            ``method="quantize"`` without ``bits``, else ``bits``. 2-bit
            probabilities of sharp attention rows made a ViT's query and key
            gradients three times noisier (BENCHMARKS.md, "Softmax
            probabilities in 4 bits").

    Raises:
        ValueError: ``keep`` outside (0, 1] or not finite, ``keep != 1`` with
            ``"quantize"``, an unknown ``method``, ``bits`` not one of
            1, 2, 4, 8 (or ``softmax_bits`` not), or ``per_example=False``
            with ``"norm"``.
        TypeError: ``keep`` not a real number, ``method`` not a string,
            ``per_example`` not a bool or ``bits`` (``softmax_bits``) not an int.
    """

    keep: float | None = None
    method: str = "sample"
    per_example: bool = True
    bits: int | None = None
    softmax_bits: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(
                f"radgrad: method must be one of {sorted(METHODS)}, got {self.method!r}"
            )
        keep = self.keep
        if keep is None:
            keep = 1.0 if self.method == "quantize" else _DEFAULT_KEEP
        keep = _real("keep", keep)
        if not math.isfinite(keep) or not 0.0 < keep <= 1.0:
            raise ValueError(f"radgrad: keep must be in (0, 1] and finite, got {self.keep!r}")
        if self.method == "quantize" and keep != 1.0:
            raise ValueError(
                f"radgrad: method='quantize' keeps every entry, so keep must be 1 or None, got {self.keep!r}; "
                "to quantize a sample, use method='sample' with bits"
            )
        object.__setattr__(self, "keep", keep)
        # NOTE [keep under torch.compile]: torch.compile turns a float it sees
        # change between calls into a symbol (torch 2.13 does not specialize
        # floats), and k = round(keep * D) from a float symbol cannot size a draw.
        # A str is always a compile-time constant (guarded by equality), so the
        # traced code reads keep from its exact repr.
        object.__setattr__(self, "_keep_text", repr(keep))
        if not isinstance(self.per_example, bool):
            raise TypeError(f"radgrad: per_example must be True or False, got {self.per_example!r}")
        if self.method == "norm" and not self.per_example:
            raise ValueError("radgrad: method='norm' draws positions from each row's own values; "
                             "per_example must be True")
        bits = _bits("bits", self.bits)
        defaulted = bits is None and self.method == "quantize"
        if defaulted:
            bits = DEFAULT_QUANTIZE_BITS
        softmax_bits = _bits("softmax_bits", self.softmax_bits)
        if softmax_bits is None:
            softmax_bits = DEFAULT_SOFTMAX_BITS if defaulted else bits
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "softmax_bits", softmax_bits)
        # made here, not on demand: traced code reads it as an attribute
        object.__setattr__(self, "_for_softmax", self if softmax_bits == bits else
                           SketchConfig(keep, self.method, self.per_example, softmax_bits, softmax_bits))

    @property
    def exact(self) -> bool:
        """True when nothing is randomized (``keep == 1`` and no ``bits``)."""
        return self._keep_text == "1.0" and self.bits is None

    def for_softmax(self) -> SketchConfig:
        """This config with ``bits`` set to ``softmax_bits``: how softmax stores its output."""
        return self._for_softmax

    def kept(self, d: int) -> int:
        """Number of values kept from a row of ``d`` entries."""
        return max(1, round(float(self._keep_text) * d))


class Sketch:
    """A packed tensor: what is stored for it, and how to rebuild an estimate.

    ``values`` holds the kept values (``rows x k``, or ``rows x D`` for
    ``"quantize"``), as packed codes when ``config.bits`` is set; ``state``
    the positions (``"sample"``: row bases and offsets; ``"norm"``: the
    indices) or the seed (``"project"``), or None; ``scale`` the per-row
    offset and step of quantized codes, or None; ``dtype`` the estimate's
    dtype. An autograd function saves the tensors through
    :func:`radgrad.save_for_backward`. An exact sketch (nothing randomized)
    has ``values`` the original tensor and ``state`` and ``scale`` None.
    (A plain slotted class rather than a dataclass: one is built on every
    forward and backward of every RAD op.)
    """

    __slots__ = ("values", "state", "scale", "shape", "dtype", "batch_dims", "config")

    def __init__(self, values: Tensor | None, state: Tensor | None, scale: Tensor | None,
                 shape: torch.Size, dtype: torch.dtype, batch_dims: int, config: SketchConfig) -> None:
        self.values, self.state, self.scale = values, state, scale
        self.shape, self.dtype, self.batch_dims, self.config = shape, dtype, batch_dims, config

    @property
    def exact(self) -> bool:
        """True when the sketch holds the tensor itself."""
        return self.state is None and self.scale is None

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors stored (the original tensor's, for an exact sketch)."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.state, self.scale) if t is not None)

    def unpack(self) -> Tensor:
        return unpack(self)

    def __repr__(self) -> str:
        return f"Sketch(shape={tuple(self.shape)}, batch_dims={self.batch_dims}, config={self.config})"


def _positions(config: SketchConfig, k: int, d: int) -> bool:
    """Whether a row keeps a subset or projection (rather than every entry)."""
    return config.method != "quantize" and k < d


def draw(x: Tensor, config: SketchConfig, *, batch_dims: int,
         generator: torch.Generator | None = None) -> Tensor | None:
    """The positions (``"sample"``) or seed (``"project"``) :func:`pack` draws for ``x``, or None.

    None when nothing is drawn ahead: every entry is kept (``keep == 1``,
    ``k == D``, ``"quantize"``) or the positions depend on the values
    (``"norm"``). ``pack(x, ..., state=draw(x, ...))`` is ``pack(x, ...)``;
    two tensors packed with one state keep the same positions or signs.
    Rounding (``bits``) is drawn by :func:`pack` itself.
    """
    _check(x, config, batch_dims)
    rows, d = _rows_and_width(x.shape, batch_dims)
    k = config.kept(d)
    if rows == 0 or not _positions(config, k, d) or config.method == "norm":
        return None
    if d > _MAX_WIDTH:
        raise ValueError(f"radgrad: rows of at most 2**31 - 1 entries can be sketched, got {d}")
    if config.method == "sample":
        return sample.draw(rows, d, k, config.per_example, x, generator)
    return rng.draw_seed(x, generator)


def pack(
    x: Tensor, config: SketchConfig, *, batch_dims: int, generator: torch.Generator | None = None,
    state: Tensor | None = None,
) -> Sketch:
    """Pack ``x`` into a :class:`Sketch` whose :func:`unpack` is an unbiased estimate of ``x``.

    Args:
        x: a floating-point tensor, of any strides and device.
        config: method, keep fraction, per-example setting and bits.
        batch_dims: how many leading dimensions index rows (NOTE [Sketch layout]).
        generator: draw from this generator instead of torch's default
            generator of ``x``'s device.
        state: use these positions or signs instead of drawing them: what
            :func:`draw` returned for ``x``, or the ``state`` of another
            ``"sample"`` or ``"project"`` sketch with the same config, shape and
            ``batch_dims``.

    Returns:
        A Sketch (NOTE [What a sketch stores]); for an exact config, for
        ``k == D`` without ``bits`` and for an empty tensor it holds ``x``
        itself (nothing drawn).

    Raises:
        TypeError: ``x`` is not a floating-point tensor, or ``config`` not a :class:`SketchConfig`.
        ValueError: ``batch_dims`` is not between 0 and ``x.dim()``, a row has
            more than 2**31 - 1 entries, or ``state`` does not fit.
    """
    return _pack(x, config, batch_dims, generator, state, 1)[0]


def pack_copies(x: Tensor, config: SketchConfig, *, batch_dims: int, copies: int,
                generator: torch.Generator | None = None) -> list[Sketch]:
    """``copies`` independent sketches of ``x``: what as many calls of :func:`pack` return.

    With ``method="quantize"`` the copies share one range and scale (the
    same, computed once) and draw their roundings in one call, independently
    of each other: cheaper than separate calls. An op whose backward
    multiplies two estimates of one tensor needs such independent copies
    (NOTE [Layer norm from two sketches] in :mod:`radgrad.functional`).
    """
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"radgrad: copies must be a positive int, got {copies!r}")
    return _pack(x, config, batch_dims, generator, None, copies)


def _pack(x: Tensor, config: SketchConfig, batch_dims: int, generator: torch.Generator | None,
          state: Tensor | None, copies: int) -> list[Sketch]:
    _check(x, config, batch_dims)
    rows, d = _rows_and_width(x.shape, batch_dims)
    k = config.kept(d)
    positions = _positions(config, k, d)
    if config.exact or rows == 0 or d == 0 or not (positions or config.bits):
        return [Sketch(x, None, None, x.shape, x.dtype, batch_dims, config) for _ in range(copies)]
    if d > _MAX_WIDTH:
        raise ValueError(f"radgrad: rows of at most 2**31 - 1 entries can be sketched, got {d}")
    if positions and copies > 1:  # each copy draws positions or signs of its own
        return [_pack(x, config, batch_dims, generator, None, 1)[0] for _ in range(copies)]
    if state is not None:
        _check_state(state, config, rows, k, positions)
    xr = _as_rows(x, batch_dims)
    if not positions:
        values = xr.reshape(rows, d)
    elif config.method == "sample":
        if state is None:
            state = sample.draw(rows, d, k, config.per_example, x, generator)
        values = sample.gather(xr, state, k, config.per_example)
    elif config.method == "norm":
        values, state = norm.gather(xr.reshape(rows, d), k, x, generator)
    else:
        if state is None:
            state = rng.draw_seed(x, generator)
        values = project.project(xr.reshape(rows, d), state, k, config.per_example)
    if config.bits is None:
        return [Sketch(values, state, None, x.shape, x.dtype, batch_dims, config)]
    codes, scale = quantize.quantize_copies(values, config.bits, x, generator, copies)
    # every copy its own scale tensor: an autograd function returns each as an output of its own
    scales = [scale] + [scale.clone() for _ in codes[1:]]
    return [Sketch(c, state, s, x.shape, x.dtype, batch_dims, config) for c, s in zip(codes, scales)]


def unpack(sketch: Sketch) -> Tensor:
    """The unbiased estimate of the packed tensor, with its original shape.

    For a randomized sketch the result is a new tensor; otherwise it is the
    packed tensor itself.
    """
    if not isinstance(sketch, Sketch):
        raise TypeError(f"radgrad.unpack: sketch must be a radgrad.Sketch (from radgrad.pack), "
                        f"got {type(sketch).__name__}")
    if sketch.exact:
        return sketch.values
    return unpack_rows(sketch, 0, _rows_and_width(sketch.shape, sketch.batch_dims)[0]).view(sketch.shape)


def unpack_rows(sketch: Sketch, lo: int, hi: int) -> Tensor:
    """Rows ``lo .. hi`` of the estimate, as a ``(hi - lo, D)`` tensor (NOTE [Sketch layout]).

    A backward pass that reads a sketch a block of rows at a time never holds
    the whole dense estimate, only a block of it.
    """
    rows, d = _rows_and_width(sketch.shape, sketch.batch_dims)
    if sketch.exact:
        return sketch.values.reshape(rows, d)[lo:hi]
    config, values, state = sketch.config, sketch.values[lo:hi], sketch.state
    if sketch.scale is not None:
        n = d if state is None else config.kept(d)
        values = quantize.dequantize(values, sketch.scale, config.bits, n, sketch.dtype, lo)
    if state is None:
        return values
    if config.method == "sample":
        return sample.scatter(values, state, lo, d, config.per_example)
    if config.method == "norm":
        return norm.scatter(values, state[lo:hi], d)
    return project.back_project(values, state, lo, d, config.per_example)


def plane_shape(sketch: Sketch) -> list[int] | None:
    """The sketch's shape with each row split into its code planes: ``(*batch, planes, width)``.

    None unless every entry of a row is quantized and the codes fill their
    planes exactly (NOTE [Code packing] in :mod:`radgrad.estimators.quantize`).
    An estimate viewed in this shape reads code ``j`` of plane ``i`` from
    byte ``j`` at shift ``bits * i``: no division by the plane width.
    """
    if sketch.state is not None or sketch.scale is None:
        return None
    d = _rows_and_width(sketch.shape, sketch.batch_dims)[1]
    width = quantize.plane_width(d, sketch.config.bits)
    if width is None:
        return None
    return [*sketch.shape[:sketch.batch_dims], d // width, width]


def tie(output: Tensor, *items: Tensor | Sketch | None) -> Tensor:
    """``output``, made to depend on the random draws of ``items`` under ``torch.compile``.

    The value is ``output`` itself, bit for bit (it is multiplied by a true
    boolean). Call it on the output of an autograd function's forward with
    every sketch it packed (or a state from :func:`draw`): under
    ``torch.compile`` this keeps what the backward pass reads computed in the
    forward pass (NOTE [Draws are saved, never redrawn] in :mod:`radgrad.rng`).
    Eagerly it returns ``output`` untouched.
    """
    if not isinstance(output, Tensor):
        raise TypeError(f"radgrad.tie: output must be a Tensor, got {type(output).__name__}")
    if not torch.compiler.is_compiling():
        return output
    for item in items:
        drawn = (item.state, item.values if item.scale is not None else None) \
            if isinstance(item, Sketch) else (item,)
        for t in drawn:
            if t is not None and t.numel():
                output = output * (t.reshape(-1)[0] | 1).ne(0)
    return output


def check_config(where: str, config: SketchConfig) -> None:
    """Raise a TypeError, prefixed ``where``, unless ``config`` is a :class:`SketchConfig`."""
    if not isinstance(config, SketchConfig):
        raise TypeError(f"{where}: config must be a radgrad.SketchConfig, got {type(config).__name__}")


def _check(x: Tensor, config: SketchConfig, batch_dims: int) -> None:
    check_config("radgrad", config)
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"radgrad: can only sketch floating-point tensors, got {got}")
    if isinstance(batch_dims, bool) or not isinstance(batch_dims, int) or not 0 <= batch_dims <= x.dim():
        raise ValueError(
            f"radgrad: batch_dims must be an int in [0, {x.dim()}] for a tensor of shape "
            f"{tuple(x.shape)}, got {batch_dims!r}"
        )


def _check_state(state: Tensor, config: SketchConfig, rows: int, k: int, positions: bool) -> None:
    if not positions or config.method == "norm":
        raise ValueError(
            f"radgrad: state= gives the positions or signs of method 'sample' or 'project' with keep < 1; "
            f"this config ({config}) draws none ahead (see radgrad.draw)"
        )
    if config.method == "sample":
        shape = sample.state_shape(rows, k, config.per_example)
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
