"""RAD autograd functions: linear, convolution, ReLU and pooling.

Nothing here knows about modules: each public function takes tensors and a
:class:`~radgrad.sketch.SketchConfig` and is a drop-in for its
``torch.nn.functional`` twin.

Contract of every function here:
    * the forward value is exactly torch's;
    * the gradient with respect to the input is exactly torch's (it needs the
      weight, the 1-bit ReLU mask or the pooling indices, never the input);
    * the bias gradient is exact;
    * only the weight gradient is an estimate (unbiased): it is computed from
      an unpacked sketch of the input (:mod:`radgrad.sketch`);
    * with an exact config (``keep=1``, no ``bits``), with gradients disabled, or when the weight
      needs no gradient, the torch function itself runs, unchanged;
    * a second derivative through a randomized op raises RuntimeError.

Under CPU or CUDA autocast the inputs are cast as autocast would cast them
for the torch op, and the op runs in that dtype.
"""

from radgrad.functional._attention import scaled_dot_product_attention
from radgrad.functional._conv import conv
from radgrad.functional._elementwise import dropout, elementwise
from radgrad.functional._linear import linear
from radgrad.functional._norm import layer_norm
from radgrad.functional._pool import avg_pool1d, avg_pool2d, max_pool2d, relu
from radgrad.functional._recurrence import recurrence

__all__ = [
    "linear", "conv", "relu", "avg_pool1d", "avg_pool2d", "max_pool2d", "recurrence",
    "elementwise", "dropout", "layer_norm", "scaled_dot_product_attention",
]
