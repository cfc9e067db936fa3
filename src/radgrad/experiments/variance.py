"""Variance of the weight-gradient estimates, per layer: RAD against the reduced batch at equal memory.

Every estimator is evaluated many times on the same parameters (at
initialisation, or after ``warmup`` iterations of baseline training).

NOTE [Relative variance]
    The population is a fixed *reference set* of R training examples; every
    minibatch is drawn from it uniformly with replacement, so each
    estimator's mean is ``g_ref``, the exact gradient of the mean loss over
    the reference set (all of radgrad's estimators are unbiased). For one
    weight W, the number reported is

        relative variance = E ||g_hat_W - g_W||^2 / ||g_ref,W||^2

    (the per-entry variances summed over the entries of W, over the squared
    norm of the reference gradient), estimated by the mean over the draws,
    with its standard error. The mean ``g_W`` is known exactly, so no
    sample mean is subtracted:

    * ``minibatch``: exact gradient of a fresh minibatch; ``g = g_ref``.
    * ``RAD only``: one fixed minibatch of the full batch size, a fresh RAD
      draw each time; ``g = g_B0``, the exact gradient of that minibatch.
      This is the variance RAD adds, on its own.
    * ``RAD + minibatch``: a fresh minibatch and a fresh RAD draw; ``g = g_ref``.
      This is the variance SGD sees.

    The row ``all weights`` sums the squared errors and the squared norms over
    the weights. Biases are left out: their gradients are exact under RAD.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

import radgrad
from radgrad.experiments import budget, options, plots, report
from radgrad.experiments.data import Tensors
from radgrad.experiments.tasks import METHODS, get_method, get_task, load_data
from radgrad.experiments.train import RunConfig, fit, sampler_seed

__all__ = ["VarianceConfig", "study", "render", "write", "RAD_METHODS", "STEM", "ALL", "MIN_DRAWS"]

RAD_METHODS: tuple[str, ...] = tuple(name for name, m in METHODS.items() if m.rad and not m.allocate)
STEM = "variance"
ALL = "all weights"
MIN_DRAWS = 2  # the fewest draws that give a standard error
_CHUNK = 500


@dataclass(frozen=True)
class VarianceConfig:
    """The study's settings (see :func:`study`).

    Attributes:
        task: task name.
        keep: RAD's keep fraction (also sets the reduced batch).
        draws: estimates per estimator (at least :data:`MIN_DRAWS`).
        seed: seeds the parameters, the reference set, the minibatches and RAD.
        warmup: baseline training iterations before measuring (0: at initialisation).
        reference: size R of the reference set (NOTE [Relative variance]).
        batch: the full batch (default: the task's, 150).
        methods: the RAD methods to measure.
        threads: torch CPU threads.
        data: dataset file or folder (default: the task loader's default).
    """

    task: str
    keep: float = 0.1
    draws: int = 200
    seed: int = 0
    warmup: int = 0
    reference: int = 2000
    batch: int | None = None
    methods: tuple[str, ...] = RAD_METHODS
    threads: int = 1
    data: str | None = None

    def check(self) -> None:
        """Raise ValueError on an unknown name or a value out of range."""
        get_task(self.task)
        for name in self.methods:
            if not get_method(name).rad:
                raise ValueError(f"radgrad: variance compares RAD methods ({', '.join(RAD_METHODS)}) "
                                 f"with the batches; got {name!r}")
        options.check_keep(self.keep)
        options.check_int("draws", self.draws, MIN_DRAWS)
        options.check_seed(self.seed)
        options.check_int("warmup", self.warmup, 0)
        options.check_int("reference", self.reference)
        if self.batch is not None:
            options.check_int("batch", self.batch)
        options.check_int("threads", self.threads, 1, options.WORKERS_MAX)


def _weights(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.dim() >= 2}


def _gradient(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    weights = _weights(model)
    loss = nn.functional.cross_entropy(model(x), y)
    return dict(zip(weights, torch.autograd.grad(loss, list(weights.values()))))


def _mean_gradient(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    total: dict[str, Tensor] = {}
    for lo in range(0, len(y), _CHUNK):
        part = _gradient(model, x[lo:lo + _CHUNK], y[lo:lo + _CHUNK])
        for name, g in part.items():
            total[name] = total.get(name, 0) + g * (len(y[lo:lo + _CHUNK]) / len(y))
    return total


def _starting_model(config: VarianceConfig, batch: int, data: Tensors, progress: bool) -> nn.Module:
    if config.warmup:
        run = RunConfig(config.task, "baseline", keep=config.keep, iters=config.warmup, seed=config.seed,
                        batch=batch, eval_every=config.warmup, eval_size=1, threads=config.threads)
        return fit(run, data, progress)
    torch.manual_seed(config.seed)
    return budget.prepare(get_task(config.task).model(), "baseline", config.keep).train()


def study(config: VarianceConfig, data: Tensors | None = None, progress: bool = True) -> dict[str, Any]:
    """Measure every estimator's relative variance per weight (NOTE [Relative variance]).

    Args:
        config: the settings.
        data: in-memory data instead of loading ``config.data``.
        progress: tqdm bars on stderr.

    Returns:
        ``{"config", "batch", "reduced_batch", "rows"}``; each row names the
        ``estimator``, its ``kind``, ``batch`` and measured ``saved_bytes``, the
        ``layer``, ``relative_variance`` and its standard error ``se``.
    """
    config.check()
    torch.set_num_threads(config.threads)
    task = get_task(config.task)
    batch = task.batch if config.batch is None else config.batch
    data = load_data(task, config.data) if data is None else data
    model = _starting_model(config, batch, data, progress)
    pick = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(config.seed))
    ref_x, ref_y = data.train_x[pick[:config.reference]], data.train_y[pick[:config.reference]]
    g_ref = _mean_gradient(model, ref_x, ref_y)
    sampler = torch.Generator().manual_seed(sampler_seed(config.seed))
    fixed = torch.randint(len(ref_y), (batch,), generator=sampler)
    g_fixed = _mean_gradient(model, ref_x[fixed], ref_y[fixed])
    small = budget.reduced_batch(model, task, config.keep, batch)

    def minibatch(size: int) -> Callable[[], tuple[Tensor, Tensor]]:
        def draw() -> tuple[Tensor, Tensor]:
            idx = torch.randint(len(ref_y), (size,), generator=sampler)
            return ref_x[idx], ref_y[idx]
        return draw

    def fixed_batch() -> tuple[Tensor, Tensor]:
        return ref_x[fixed], ref_y[fixed]

    plans: list[tuple[str, str, nn.Module, int, Callable, dict[str, Tensor]]] = [
        ("baseline", "minibatch", model, batch, minibatch(batch), g_ref),
        ("reduced-batch", "minibatch", model, small, minibatch(small), g_ref),
    ]
    for name in config.methods:
        rad = budget.prepare(copy.deepcopy(model), name, config.keep).train()
        plans += [(name, "RAD only", rad, batch, fixed_batch, g_fixed),
                  (name, "RAD + minibatch", rad, batch, minibatch(batch), g_ref)]
    torch.manual_seed(config.seed)
    rows = []
    norms = {name: float(g.square().sum()) for name, g in g_ref.items()}
    for method, kind, net, size, draw, target in plans:
        errors = {name: torch.empty(config.draws, dtype=torch.float64) for name in (*g_ref, ALL)}
        for d in tqdm(range(config.draws), desc=f"{method} {kind}", disable=not progress, leave=False):
            grads = _gradient(net, *draw())
            for name, g in grads.items():
                errors[name][d] = float((g - target[name]).square().sum())
            errors[ALL][d] = sum(float(errors[name][d]) for name in grads)
        saved = budget.saved_bytes(net, task, size)
        for layer, err in errors.items():
            norm = sum(norms.values()) if layer == ALL else norms[layer]
            rows.append({
                "estimator": f"{method} ({kind})", "method": method, "kind": kind, "batch": size,
                "saved_bytes": saved, "layer": layer, "shape": "x".join(map(str, _shape(g_ref, layer))),
                "relative_variance": float(err.mean()) / norm,
                "se": float(err.std()) / config.draws**0.5 / norm,
            })  # fmt: skip
    return {"config": asdict(config), "batch": batch, "reduced_batch": small, "rows": rows,
            "radgrad_version": radgrad.__version__, "torch_version": torch.__version__}


def _shape(g_ref: dict[str, Tensor], layer: str) -> tuple[int, ...]:
    return tuple(g_ref[layer].shape) if layer in g_ref else (sum(g.numel() for g in g_ref.values()),)


def _by_estimator(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for r in rows:
        table.setdefault(r["estimator"], {})[r["layer"]] = (r["relative_variance"], r["se"])
    return table


def render(result: dict[str, Any]) -> str:
    """The result as markdown: one row per estimator, one column per weight."""
    rows, c = result["rows"], result["config"]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    shapes = {r["layer"]: r["shape"] for r in rows}
    meta = {r["estimator"]: r for r in rows}
    lines = [[name, meta[name]["batch"], f"{meta[name]['saved_bytes'] / 1e6:.3f}",
              *(f"{v:.3g} ± {se:.1g}" for v, se in cells.values())]
             for name, cells in _by_estimator(rows).items()]
    start = f"after {c['warmup']} baseline iterations" if c["warmup"] else "at initialisation"
    intro = (f"# Gradient variance: {c['task']}, keep {c['keep']:g}, {c['draws']} draws, seed {c['seed']}\n\n"
             f"Parameters fixed {start}. Relative variance E‖ĝ − g‖² / ‖g_ref‖² per weight (mean over "
             f"draws ± standard error): g_ref is the exact gradient over a reference set of "
             f"{c['reference']} training examples, from which every minibatch is drawn with replacement; "
             "g = g_ref for `minibatch` and `RAD + minibatch` (total variance), g = the exact gradient "
             "of one fixed minibatch for `RAD only` (RAD's sampling alone). saved MB: bytes saved for "
             f"backward per step, measured by radgrad.memory. Reduced batch {result['reduced_batch']} "
             f"has no more saved memory than RAD at keep {c['keep']:g}.\n\n")
    header = ["estimator", "batch", "saved MB", *(f"{layer} ({shapes[layer]})" for layer in layers)]
    return intro + report.markdown(header, lines)


def write(result: dict[str, Any], md: str, out: Path) -> list[Path]:
    """Write ``variance.md``, ``.csv``, ``.json`` and the bar chart ``variance.png`` into ``out``."""
    paths = report.write_outputs(out, STEM, md, result["rows"])
    paths.append(out / f"{STEM}.json")
    paths[-1].write_text(json.dumps(result, indent=1))
    c = result["config"]
    fig = plots.variance_bars(
        _by_estimator(result["rows"]),
        f"{c['task']}: weight-gradient variance, keep {c['keep']:g}, {c['draws']} draws "
        f"(reduced batch {result['reduced_batch']}); error bars ±2 SE",
        "relative variance  E‖ĝ − g‖² / ‖g_ref‖²",
    )
    paths.append(out / f"{STEM}.png")
    fig.savefig(paths[-1], dpi=120)
    return paths
