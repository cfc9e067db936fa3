"""RAD autograd functions: linear, convolution, ReLU, PReLU, pooling, recurrence, activations, norms,
attention.

Nothing here knows about modules: each public function takes tensors and a
:class:`~radgrad.sketch.SketchConfig` and is a drop-in for its
``torch.nn.functional`` twin.

Contract of every function here:
    * the forward value is exactly torch's;
    * linear, conv, conv_transpose, recurrence: the input and bias gradients are exact (they
      need the weight, never the input) and only the weight gradient is an
      estimate, computed from an unpacked sketch of the input
      (:mod:`radgrad.sketch`);
    * lstm_recurrence, gru_recurrence: the outputs exact up to rounding (torch's arithmetic in
      another order); every gradient an estimate, from per-step coefficients
      rounded stochastically and, for the recurrent weight, sketches of the states;
    * relu, pooling, dropout: everything exact (bit masks, offsets, shapes);
    * prelu: the input gradient exact (a bit mask and the slope), the slope's
      gradient an estimate from a sketch of the input's negative part;
    * elementwise, layer_norm, rms_norm, batch_norm, group_norm, instance_norm,
      scaled_dot_product_attention, matmul, baddbmm, einsum, mul, softmax, log_softmax, cross_entropy: the gradients
      that flow on to the inputs are estimates too (each function's
      docstring says which), built from independent sketches of the factors
      the backward pass multiplies, so every estimate is unbiased;
    * with an exact config (``keep=1``, no ``bits``), with gradients disabled, or when the weight
      needs no gradient, the torch function itself runs, unchanged (prelu with a frozen slope
      saves its bit mask only);
    * a second derivative through a randomized op raises RuntimeError.

Under CPU or CUDA autocast the inputs are cast as autocast would cast them
for the torch op, and the op runs in that dtype.
"""

from radgrad.functional._attention import multi_head_attention_forward, scaled_dot_product_attention
from radgrad.functional._conv import conv, conv_transpose
from radgrad.functional._elementwise import dropout, elementwise
from radgrad.functional._gru import gru_recurrence
from radgrad.functional._linear import linear
from radgrad.functional._lstm import lstm_recurrence
from radgrad.functional._matmul import baddbmm, einsum, matmul, mul
from radgrad.functional._norm import batch_norm, group_norm, instance_norm, layer_norm, rms_norm
from radgrad.functional._prelu import prelu
from radgrad.functional._pool import avg_pool1d, avg_pool2d, avg_pool3d, max_pool1d, max_pool2d, max_pool3d, relu
from radgrad.functional._recurrence import recurrence
from radgrad.functional._softmax import cross_entropy, log_softmax, softmax

__all__ = [
    "linear", "conv", "conv_transpose", "relu", "prelu", "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d",
    "max_pool2d", "max_pool3d",
    "recurrence", "lstm_recurrence", "gru_recurrence",
    "elementwise", "dropout", "layer_norm", "rms_norm", "batch_norm", "group_norm", "instance_norm",
    "scaled_dot_product_attention", "multi_head_attention_forward", "baddbmm", "einsum", "matmul", "mul", "softmax", "log_softmax", "cross_entropy",
]
