"""radgrad: randomized automatic differentiation for PyTorch.

A RAD layer computes its forward pass exactly but keeps, for the backward
pass, only a compact unbiased estimate of its input (a random sample, a
projection, or stochastically rounded codes): weight gradients become
unbiased estimates, everything else stays exact, and the memory saved for
backward drops to a tenth or less.

Public names: :func:`convert` (one call for an existing model; ``method="quantize"``
is the recommended setting), :func:`coverage` (what it covered), :func:`allocate` (per-layer settings within a byte
budget), :mod:`radgrad.nn` (the layers), :mod:`radgrad.functional`,
:mod:`radgrad.memory` (saved bytes and the peak of a step),
:mod:`radgrad.models` (the paper's models), and the sketch API for custom ops
(:class:`SketchConfig`, :data:`METHODS`, :data:`BITS`, :func:`draw`, :func:`pack`, :func:`unpack`, :func:`tie`,
:func:`save_for_backward`, :func:`saved_tensors`).
"""

from radgrad import functional, memory, models, nn
from radgrad.allocate import allocate
from radgrad.convert import convert
from radgrad.coverage import Coverage, coverage
from radgrad.saved import save_for_backward, saved_tensors
from radgrad.sketch import BITS, METHODS, Sketch, SketchConfig, draw, pack, tie, unpack

__version__ = "0.1.0"

__all__ = [
    "BITS",
    "Coverage",
    "METHODS",
    "Sketch",
    "SketchConfig",
    "allocate",
    "convert",
    "coverage",
    "draw",
    "functional",
    "memory",
    "models",
    "nn",
    "pack",
    "save_for_backward",
    "saved_tensors",
    "tie",
    "unpack",
]
