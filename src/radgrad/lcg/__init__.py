"""The linearized computational graph (LCG) of a PyTorch function, and RAD on it.

``radgrad.lcg.trace(fn, *inputs)`` records ``fn`` with ``make_fx`` and returns an
:class:`LCG`: vertices are the values (inputs, intermediates, output), edges
carry structured local Jacobians (a vector for elementwise ops, the other
operand for a matmul, a broadcast for a sum). On it:

* exact: :meth:`LCG.gradient` (reverse accumulation), :meth:`LCG.path_sum`
  (Bauer's formula, explicit enumeration of scalar paths);
* unbiased estimates: :meth:`LCG.sample_paths` (Monte Carlo over paths),
  :meth:`LCG.inject` (random matrix injection via :func:`radgrad.pack`).

Gradients are of ``<cotangent, output>`` (default cotangent: ones, i.e. of
``output.sum()``) w.r.t. every input, like ``torch.autograd.grad``.
"""

from radgrad.lcg.estimators import Injection
from radgrad.lcg.graph import LCG
from radgrad.lcg.trace import trace

__all__ = ["LCG", "Injection", "trace"]
