"""Drop-in RAD layers: subclasses of the torch modules that call :mod:`radgrad.functional`.

Each class has the very same parameters, buffers and ``state_dict`` keys as
its torch parent; the sketch settings are a plain attribute, ``sketch``.

In training mode with gradients on, ``Linear``, ``Conv*`` and ``ConvTranspose*`` store a random
sketch of their input (weight gradient: unbiased estimate; output, input
gradient and bias gradient: exact), ``ReLU`` stores a 1-bit mask and the
pooling layers store no input at all (everything exact). In eval mode, under
``torch.no_grad``, or when the weight needs no gradient, each module does
exactly what its torch parent does.

:func:`radgrad.convert` turns the torch modules of an existing model into
these, in place, keeping the same Parameter objects.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from radgrad import functional as RF
from radgrad.functional._elementwise import FUSED, fused_derivative
from radgrad.sketch import SketchConfig

__all__ = ["Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "ReLU", "PReLU",
           "AvgPool1d", "AvgPool2d", "AvgPool3d", "MaxPool1d", "MaxPool2d", "MaxPool3d", "RNN", "LSTM", "GRU",
           "LayerNorm", "RMSNorm", "Dropout", "Activation", "RMSNormLike", "TransposedLinear"]

M = TypeVar("M", bound=nn.Module)


class _Converted:
    """Mixin of every radgrad layer: how :func:`radgrad.convert` turns a torch module into it."""

    @classmethod
    def convertible(cls, module: nn.Module) -> bool:
        """Whether :func:`radgrad.convert` can turn this torch module into ``cls``."""
        return True

    @classmethod
    def from_torch(cls: type[M], module: nn.Module, config: SketchConfig) -> M:
        """Turn ``module`` (an instance of the torch parent, or of a subclass of it) into this class, in place.

        An instance of a subclass becomes an instance of a class made from
        both ``cls`` and its own class (once per pair), so ``isinstance``
        checks of the model's code still pass and its other methods stay.
        """
        base = getattr(module, "_radgrad_base", type(module))
        module.__class__ = cls if base in cls.__mro__ else _subclass(cls, base)
        return module


class _Sketched(_Converted):
    """Mixin of the layers that sketch their input: holds the ``sketch`` config.

    Constructed directly, such a layer takes the torch module's arguments and
    ``keep``, ``method``, ``per_example`` and ``bits`` (see
    :class:`radgrad.SketchConfig`) as keywords.
    """

    sketch: SketchConfig

    def __init__(self, *args, keep: float | None = None, method: str = "sample", per_example: bool = True,
                 bits: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sketch = SketchConfig(keep, method, per_example, bits)

    @classmethod
    def from_torch(cls: type[M], module: nn.Module, config: SketchConfig) -> M:
        module = super().from_torch(module, config)
        module.sketch = config
        return module

    @classmethod
    def for_lazy(cls, module: nn.Module, config: SketchConfig) -> None:
        """Make an unmaterialized lazy module (``nn.LazyLinear``, ...) become ``cls`` on its first forward."""
        module.cls_to_become = cls
        module.sketch = config

    def extra_repr(self) -> str:
        c = self.sketch
        bits = "" if c.bits is None else f", bits={c.bits}"
        return f"{super().extra_repr()}, keep={c.keep}, method={c.method!r}, per_example={c.per_example}{bits}"


class Linear(_Sketched, nn.Linear):
    """``nn.Linear`` whose weight gradient comes from a sketch of its input.

    Args:
        keep, method, per_example, bits: see :class:`radgrad.SketchConfig`.
        Other arguments as ``torch.nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, *, keep: float | None = None, method: str = "sample",
                 per_example: bool = True, bits: int | None = None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.sketch = SketchConfig(keep, method, per_example, bits)

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return super().forward(input)
        return RF.linear(input, self.weight, self.bias, self.sketch)


class _ConvNd(_Sketched):
    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return super().forward(input)
        padding = self.padding
        if self.padding_mode != "zeros":
            input = nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return RF.conv(input, self.weight, self.bias, self.stride, padding, self.dilation,
                       self.groups, self.sketch)


class Conv1d(_ConvNd, nn.Conv1d):
    """``nn.Conv1d`` whose weight gradient comes from a sketch of its input's positions.

    Args:
        keep, method, per_example, bits: see :class:`radgrad.SketchConfig`.
        Other arguments as ``torch.nn.Conv1d``.
    """


class Conv2d(_ConvNd, nn.Conv2d):
    """``nn.Conv2d`` whose weight gradient comes from a sketch of its input's positions.

    Args:
        keep, method, per_example, bits: see :class:`radgrad.SketchConfig`.
        Other arguments as ``torch.nn.Conv2d``.
    """


class Conv3d(_ConvNd, nn.Conv3d):
    """``nn.Conv3d`` whose weight gradient comes from a sketch of its input's positions.

    Args:
        keep, method, per_example, bits: see :class:`radgrad.SketchConfig`.
        Other arguments as ``torch.nn.Conv3d``.
    """


class _ConvTransposeNd(_Sketched):
    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        if not self.training:
            return super().forward(input, output_size)
        if self.padding_mode != "zeros":  # torch's own error
            return super().forward(input, output_size)
        n = len(self.kernel_size)
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size,
                                              n, self.dilation)
        return RF.conv_transpose(input, self.weight, self.bias, self.stride, self.padding, output_padding,
                                 self.groups, self.dilation, self.sketch)


class ConvTranspose1d(_ConvTransposeNd, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` whose weight gradient comes from a sketch of its input's positions.

    Args:
        keep, method, per_example, bits: see :class:`radgrad.SketchConfig`.
        Other arguments as ``torch.nn.ConvTranspose1d``.
    """


class ConvTranspose2d(_ConvTransposeNd, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` whose weight gradient comes from a sketch of its input's positions.

    Args:
        keep, method, per_example, bits: see :class:`radgrad.SketchConfig`.
        Other arguments as ``torch.nn.ConvTranspose2d``.
    """


class ConvTranspose3d(_ConvTransposeNd, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` whose weight gradient comes from a sketch of its input's positions.

    Args:
        keep, method, per_example, bits: see :class:`radgrad.SketchConfig`.
        Other arguments as ``torch.nn.ConvTranspose3d``.
    """


class ReLU(_Converted, nn.ReLU):
    """``nn.ReLU`` that saves a 1-bit mask instead of its output (exact).

    While training, ``inplace=True`` is honoured in eval mode only: the RAD
    path returns a new tensor.
    """

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return super().forward(input)
        return RF.relu(input)


class PReLU(_Sketched, nn.PReLU):
    """``nn.PReLU`` that saves a 1-bit mask and a sketch of its input's negative part instead of its input.

    Exact: the output and the input gradient. Estimated (unbiased): the
    slope's gradient (:func:`radgrad.functional.prelu`).

    Args:
        keep, method, per_example, bits: see :class:`radgrad.SketchConfig`.
        Other arguments as ``torch.nn.PReLU``.
    """

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return super().forward(input)
        return RF.prelu(input, self.weight, self.sketch)


class AvgPool1d(_Converted, nn.AvgPool1d):
    """``nn.AvgPool1d`` that saves only its input's shape (exact)."""

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return super().forward(input)
        return RF.avg_pool1d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                             self.count_include_pad)


class _AvgPoolNd(_Converted):
    """What :class:`AvgPool2d` and :class:`AvgPool3d` share."""

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return super().forward(input)
        pool = RF.avg_pool2d if isinstance(self, nn.AvgPool2d) else RF.avg_pool3d
        return pool(input, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad,
                    self.divisor_override)


class AvgPool2d(_AvgPoolNd, nn.AvgPool2d):
    """``nn.AvgPool2d`` that saves only its input's shape (exact)."""


class AvgPool3d(_AvgPoolNd, nn.AvgPool3d):
    """``nn.AvgPool3d`` that saves only its input's shape (exact)."""


class _MaxPoolNd(_Converted):
    """What :class:`MaxPool1d`, :class:`MaxPool2d` and :class:`MaxPool3d` share."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.return_indices:
            raise ValueError(f"radgrad.nn.MaxPool{self._dims()}d: return_indices=True is not supported")

    def _dims(self) -> int:
        return 1 if isinstance(self, nn.MaxPool1d) else 2 if isinstance(self, nn.MaxPool2d) else 3

    @classmethod
    def convertible(cls, module: nn.Module) -> bool:
        return not module.return_indices

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return super().forward(input)
        pool = (RF.max_pool1d, RF.max_pool2d, RF.max_pool3d)[self._dims() - 1]
        return pool(input, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)


class MaxPool1d(_MaxPoolNd, nn.MaxPool1d):
    """``nn.MaxPool1d`` that saves one byte per output instead of its input and int64 indices (exact).

    ``return_indices=True`` is not supported (:func:`radgrad.convert` leaves such modules alone).
    """


class MaxPool2d(_MaxPoolNd, nn.MaxPool2d):
    """``nn.MaxPool2d`` that saves one byte per output instead of its input and int64 indices (exact).

    ``return_indices=True`` is not supported (:func:`radgrad.convert` leaves such modules alone).
    """


class MaxPool3d(_MaxPoolNd, nn.MaxPool3d):
    """``nn.MaxPool3d`` that saves one byte per output (windows up to 256 entries) instead of its input
    and int64 indices (exact).

    ``return_indices=True`` is not supported (:func:`radgrad.convert` leaves such modules alone).
    """


class _Recurrent(_Sketched):
    """Mixin of the recurrent layers: the loop over layers around a RAD recurrence (``_recurrence``)."""

    _states = 1  # kinds of state per layer: hidden (and cell, for an LSTM)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self, "proj_size", 0):
            raise ValueError(f"radgrad.nn.{self._torch_name}: proj_size > 0 is not supported")

    @classmethod
    def convertible(cls, module: nn.Module) -> bool:
        return not getattr(module, "proj_size", 0)

    def forward(self, input: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Any]:
        if not self._randomized():
            return super().forward(input, hx)
        states = None if hx is None else tuple(hx) if self._states > 1 else (hx,)
        output, last = self._layers(input, states)
        return output, (last if self._states > 1 else last[0])

    def _randomized(self) -> bool:
        return self.training and torch.is_grad_enabled() and not self.sketch.exact \
            and any(p.requires_grad for p in self.parameters())

    def _recurrence(self, layer: str, v: Tensor, states: list[Tensor]) -> tuple[Tensor, ...]:
        """Layer ``layer`` (``"0"``, ``"0_reverse"``, ...) over all steps: ``v`` its input projections
        (input bias included), ``states`` its initial states; returns the outputs, then the last states."""
        raise NotImplementedError

    def _hidden(self, layer: str) -> tuple[Tensor, Tensor | None]:
        """Layer ``layer``'s hidden-to-hidden weight and bias (None without biases)."""
        return getattr(self, f"weight_hh_l{layer}"), getattr(self, f"bias_hh_l{layer}") if self.bias else None

    def _layers(self, input: Tensor, states: tuple[Tensor, ...] | None) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The outputs of the last layer and the last states of every layer and direction
        (``_states`` kinds: hidden, and cell for an LSTM), as torch's module returns them. A
        bidirectional layer runs its reverse direction on the reversed sequence."""
        if not isinstance(input, Tensor):
            raise TypeError(f"radgrad.nn.{self._torch_name}: PackedSequence inputs are not supported; "
                            "exclude this module from radgrad.convert()")
        batched = input.dim() == 3
        if not batched:
            input, states = input.unsqueeze(1), None if states is None else tuple(s.unsqueeze(1) for s in states)
        elif self.batch_first:
            input = input.transpose(0, 1)
        directions = 2 if self.bidirectional else 1
        if states is None:
            states = (input.new_zeros(self.num_layers * directions, input.shape[1], self.hidden_size),) * self._states
        last = []
        for layer in range(self.num_layers):
            outputs = []
            for direction, suffix in enumerate(("", "_reverse")[:directions]):
                name = f"{layer}{suffix}"
                b_ih = getattr(self, f"bias_ih_l{name}") if self.bias else None
                sequence = input.flip(0) if direction else input
                v = RF.linear(sequence, getattr(self, f"weight_ih_l{name}"), b_ih, self.sketch)
                output, *ends = self._recurrence(name, v, [s[layer * directions + direction] for s in states])
                outputs.append(output.flip(0) if direction else output)
                last.append(ends)
            input = outputs[0] if directions == 1 else torch.cat(outputs, -1)
            if self.dropout and layer < self.num_layers - 1:
                input = nn.functional.dropout(input, self.dropout, training=True)
        ends = tuple(torch.stack(kind) for kind in zip(*last))
        if not batched:
            return input.squeeze(1), tuple(e.squeeze(1) for e in ends)
        return (input.transpose(0, 1) if self.batch_first else input), ends

    @property
    def _torch_name(self) -> str:
        return next(c.__name__ for c in type(self).__mro__ if c.__module__.startswith("torch."))


class RNN(_Recurrent, nn.RNN):
    """``nn.RNN`` (Elman, ReLU or tanh) with RAD weight gradients.

    Same parameters and ``state_dict`` as ``torch.nn.RNN``. While training,
    each layer's input-to-hidden weight gradient comes from sketches of its
    inputs and, with ``nonlinearity="relu"``, the hidden-to-hidden weight
    gradient from sketches of the previous states: a fresh draw at every time
    step and for every example. Outputs, the gradients with respect to the
    input and ``hx``, and all bias gradients are exact. With tanh the states
    are stored in full (the tanh derivative needs them), so the recurrent
    weight gradient is exact too and only the input weights are randomized.

    A bidirectional layer runs its reverse direction on the reversed
    sequence. Not supported: ``PackedSequence`` inputs. See
    :func:`radgrad.models.irnn_init_` for the IRNN initialisation.

    Args:
        keep, method, per_example, bits: see :class:`radgrad.SketchConfig`.
        Other arguments as ``torch.nn.RNN``.
    """

    def _recurrence(self, layer: str, v: Tensor, states: list[Tensor]) -> tuple[Tensor, ...]:
        weight, bias = self._hidden(layer)
        return RF.recurrence(v if bias is None else v + bias, states[0], weight, self.nonlinearity, self.sketch)


class LayerNorm(_Sketched, nn.LayerNorm):
    """``nn.LayerNorm`` that saves two sketches of its normalized input and the row scales.

    Exact: the output and the bias gradient. Estimated (unbiased): the input
    and weight gradients (NOTE [Layer norm from two sketches] in
    :mod:`radgrad.functional`).
    """

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return super().forward(input)
        return RF.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, self.sketch)


class RMSNorm(_Sketched, nn.RMSNorm):
    """``nn.RMSNorm`` that saves two sketches of its normalized input and the row scales.

    Exact: the output. Estimated (unbiased): the input and weight gradients
    (NOTE [Layer norm from two sketches] in :mod:`radgrad.functional`).
    """

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return super().forward(input)
        return RF.rms_norm(input, self.normalized_shape, self.weight, self.eps, self.sketch)


class Dropout(_Converted, nn.Dropout):
    """``nn.Dropout`` that saves its mask as one bit per entry (exact).

    While training, ``inplace=True`` is honoured in eval mode only (where
    dropout does nothing anyway): the RAD path returns a new tensor.
    """

    def forward(self, input: Tensor) -> Tensor:
        return RF.dropout(input, self.p, self.training)


class _Dynamic(_Sketched):
    """Mixin of the radgrad layers made for a class radgrad does not know in advance.

    :func:`radgrad.convert` turns such a module into a subclass of both this
    mixin and the module's own class, made once per class (so ``isinstance``
    checks of the model's code still pass); it pickles and deep-copies as its
    original class plus the mixin.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if getattr(type(self), "_radgrad_base", None) is None:
            raise TypeError(f"radgrad.nn.{type(self).__name__} is not constructed directly: radgrad.convert(model) "
                            f"makes it from a module of the model")
        super().__init__(*args, **kwargs)


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _subclass(mixin: type, base: type) -> type:
    """The class of a converted ``base`` instance: ``mixin`` first, then ``base``; it pickles and
    deep-copies as the pair (:func:`_rebuild`)."""
    key = (mixin, base)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(base.__name__, (mixin, base), {
            "_radgrad_mixin": mixin, "_radgrad_base": base, "__module__": base.__module__,
            "__qualname__": f"{base.__qualname__}[radgrad.{mixin.__name__}]", "__reduce_ex__": _reduce_ex})
    return _SUBCLASSES[key]


def _reduce_ex(self: nn.Module, protocol: int):
    _, _, *rest = object.__reduce_ex__(self, max(protocol, 2))
    return (_rebuild, (self._radgrad_mixin, self._radgrad_base), *rest)


def _rebuild(mixin: type, base: type) -> nn.Module:
    return object.__new__(_subclass(mixin, base))


class Activation(_Dynamic):
    """An elementwise activation that saves a sketch of its derivative instead of its input.

    Made by :func:`radgrad.convert` for any parameter-free module it finds to
    act entry by entry (torch's ``GELU``, ``SiLU``, ``Tanh``..., or a model's
    own, such as Hugging Face's ``NewGELUActivation``). Exact: the output.
    Estimated (unbiased): the input gradient (:func:`radgrad.functional.elementwise`).
    While training, ``inplace=True`` is honoured in eval mode only.
    """

    #: The name in :data:`radgrad.functional.FUSED` of the function this module computes, if any.
    fused: str | None = None

    @classmethod
    def from_torch(cls, module: nn.Module, config: SketchConfig) -> nn.Module:
        module = super().from_torch(module, config)
        module.fused = fused_derivative(module._plain)
        return module

    def _plain(self, input: Tensor) -> Tensor:
        forward = super().forward
        return forward(input.clone()) if getattr(self, "inplace", False) else forward(input)

    def forward(self, input: Tensor, *args, **kwargs) -> Tensor:
        if not self.training or args or kwargs or not isinstance(input, Tensor) or not input.is_floating_point():
            return super().forward(input, *args, **kwargs)
        derivative = None if self.fused is None else FUSED[self.fused][1]
        return RF.elementwise(self._plain, input, self.sketch, derivative)


class RMSNormLike(_Dynamic):
    """A model's own RMS normalization over its last dimension, such as Hugging Face's ``LlamaRMSNorm``.

    Made by :func:`radgrad.convert` for a module with one parameter, a
    ``weight`` of the last dimension's size, and an ``eps`` (or
    ``variance_epsilon``) attribute, that a probe finds to compute
    ``(weight + weight_offset) * x / sqrt(mean(x**2) + eps)``, with
    ``weight_offset`` 0 or, as Gemma's norm, 1. Exact: the output, computed
    by the module's own code. Estimated (unbiased): the input and weight
    gradients, from two sketches of the normalized input
    (:func:`radgrad.functional.rms_norm`).
    """

    #: What the module adds to its weight before scaling (Gemma's norm: 1).
    weight_offset: float = 0.0

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or not isinstance(input, Tensor) or not input.is_floating_point():
            return super().forward(input)
        weight = self.weight + self.weight_offset if self.weight_offset else self.weight
        return RF.rms_norm(input, input.shape[-1:], weight, float(rms_epsilon(self)), self.sketch,
                           forward=super().forward)


#: Where a model's own RMS normalization keeps its epsilon, in the order looked for.
_EPSILON_NAMES = ("variance_epsilon", "eps", "epsilon")


def rms_epsilon(module: nn.Module) -> float | None:
    """The ``eps`` attribute of a module (under one of :data:`_EPSILON_NAMES`), if it is a number."""
    for name in _EPSILON_NAMES:
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    return None


class TransposedLinear(_Dynamic):
    """A linear layer whose weight is stored ``(in, out)``, such as Hugging Face's ``Conv1D``.

    Computes ``input @ weight + bias`` with the RAD linear op: exact output,
    input and bias gradients; weight gradient from a sketch of the input.
    """

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return super().forward(input)
        return RF.linear(input, self.weight.t(), self.bias, self.sketch)


class LSTM(_Recurrent, nn.LSTM):
    """``nn.LSTM`` whose backward pass through time reads compressed coefficients.

    Same parameters and ``state_dict`` as ``torch.nn.LSTM``. While training,
    each layer's input-to-hidden weight gradient comes from sketches of its
    inputs, the hidden-to-hidden weight gradient from sketches of the
    previous states (a fresh draw at every time step and for every example),
    and the backward pass through time from six coefficients per step and
    hidden unit rounded stochastically to 4 bits (NOTE [RAD LSTM] in
    :mod:`radgrad.functional._lstm`). Every gradient is then an unbiased
    estimate; the outputs are torch's up to rounding (the same arithmetic in
    another order; in eval mode, under ``no_grad`` or with an exact config
    torch's own LSTM runs).

    Not supported: ``proj_size`` and ``PackedSequence`` inputs.

    Args:
        keep, method, per_example, bits: see :class:`radgrad.SketchConfig`.
        Other arguments as ``torch.nn.LSTM``.
    """

    _states = 2

    def _recurrence(self, layer: str, v: Tensor, states: list[Tensor]) -> tuple[Tensor, ...]:
        weight, bias = self._hidden(layer)
        return RF.lstm_recurrence(v if bias is None else v + bias, states[0], states[1], weight, self.sketch)


class GRU(_Recurrent, nn.GRU):
    """``nn.GRU`` whose backward pass through time reads compressed coefficients.

    Same parameters and ``state_dict`` as ``torch.nn.GRU``. While training,
    the input-to-hidden weight gradient comes from sketches of each layer's
    inputs, the hidden-to-hidden weight gradient from sketches of the
    previous states, and the backward pass through time from five
    coefficients per step and hidden unit rounded stochastically to 4 bits
    (NOTE [RAD GRU] in :mod:`radgrad.functional._gru`). Every gradient is
    then an unbiased estimate; the outputs are torch's up to rounding (in
    eval mode, under ``no_grad`` or with an exact config torch's own GRU runs).

    Not supported: ``PackedSequence`` inputs.

    Args:
        keep, method, per_example, bits: see :class:`radgrad.SketchConfig`.
        Other arguments as ``torch.nn.GRU``.
    """

    def _recurrence(self, layer: str, v: Tensor, states: list[Tensor]) -> tuple[Tensor, ...]:
        weight, bias = self._hidden(layer)
        return RF.gru_recurrence(v, states[0], weight, bias, self.sketch)


# torch module type -> RAD class; convert() and its documentation read this table.
CONVERSIONS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: Linear,
    nn.Conv1d: Conv1d,
    nn.Conv2d: Conv2d,
    nn.Conv3d: Conv3d,
    nn.ConvTranspose1d: ConvTranspose1d,
    nn.ConvTranspose2d: ConvTranspose2d,
    nn.ConvTranspose3d: ConvTranspose3d,
    nn.ReLU: ReLU,
    nn.PReLU: PReLU,
    nn.AvgPool1d: AvgPool1d,
    nn.AvgPool2d: AvgPool2d,
    nn.AvgPool3d: AvgPool3d,
    nn.MaxPool1d: MaxPool1d,
    nn.MaxPool2d: MaxPool2d,
    nn.MaxPool3d: MaxPool3d,
    nn.RNN: RNN,
    nn.LSTM: LSTM,
    nn.GRU: GRU,
    nn.LayerNorm: LayerNorm,
    nn.RMSNorm: RMSNorm,
    nn.Dropout: Dropout,
}


def torch_parent(cls: type) -> type[nn.Module] | None:
    """The nearest base class of ``cls`` that :data:`CONVERSIONS` converts, if any."""
    return next((parent for parent in cls.__mro__[1:] if parent in CONVERSIONS), None)
