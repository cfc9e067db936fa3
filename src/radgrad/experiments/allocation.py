"""Budget allocation against every uniform setting at the same saved bytes: ``radgrad allocate``.

:func:`radgrad.allocate` chooses each layer's sketch setting on a
calibration batch. Here the choice is judged out of sample: on another batch,
with fresh draws, the weight-gradient variance of the allocated model is set
beside that of every uniform setting (one candidate for every layer) whose
saved bytes, measured on that batch, fit the same budget.

NOTE [Judging an allocation]
    For a model with settings ``s`` and the evaluation batch, ``g`` is the
    exact gradient of the weights (not biases: they are exact under RAD) and
    the number reported is ``E||g_hat - g||^2 / ||g||^2`` over all weights,
    the mean over ``draws`` estimates with its standard error.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

import radgrad
from radgrad.allocate import CANDIDATES
from radgrad.experiments import options, report
from radgrad.experiments.data import Tensors
from radgrad.experiments.tasks import get_task, load_data
from radgrad.experiments.train import sampler_seed

__all__ = ["AllocationConfig", "study", "render", "write", "relative_errors", "STEM"]

STEM = "allocate"


@dataclass(frozen=True)
class AllocationConfig:
    """The study's settings (see :func:`study`).

    Attributes:
        task: task name (a model with linear or convolution layers).
        budget: saved bytes allowed, a fraction of the exact model's.
        batch: examples in the calibration batch and in the evaluation batch.
        calibration_draws: sketches per layer and candidate when allocating.
        draws: gradient estimates per setting when judging.
        seed: seeds the parameters, the batches and every draw.
        threads: torch CPU threads.
        data: dataset file or folder (default: the task loader's default).
    """

    task: str
    budget: float = 0.1
    batch: int = 150
    calibration_draws: int = 4
    draws: int = 30
    seed: int = 0
    threads: int = 1
    data: str | None = None

    def check(self) -> None:
        """Raise ValueError on an unknown task or a value out of range."""
        get_task(self.task)
        options.check_keep(self.budget, "budget")
        options.check_int("batch", self.batch)
        options.check_int("calibration-draws", self.calibration_draws, 2)
        options.check_int("draws", self.draws, 2)
        options.check_seed(self.seed)
        options.check_int("threads", self.threads, 1, options.WORKERS_MAX)


def _weights(model: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1].startswith("weight")]


def relative_errors(loss: Callable[[], torch.Tensor], weights: Sequence[torch.Tensor],
                    exact: Sequence[torch.Tensor], draws: int) -> np.ndarray:
    """``||g_hat - g||^2 / ||g||^2`` for ``draws`` fresh gradients ``g_hat`` of ``loss()`` with respect to
    ``weights``, where ``g`` is ``exact`` (all weights together)."""
    norm = sum(float(g.square().sum()) for g in exact)
    return np.array([sum(float((g - e).square().sum()) for g, e in zip(torch.autograd.grad(loss(), weights), exact))
                     for _ in range(draws)]) / norm


def _judge(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int) -> tuple[int, float, float]:
    """(saved bytes, relative variance, its standard error) of ``model`` on ``(x, y)`` (NOTE [Judging an allocation])."""
    saved = radgrad.memory.saved_bytes(model, x)
    settings = {m: m.sketch for m in model.modules() if hasattr(m, "sketch")}
    for m in settings:
        m.sketch = radgrad.SketchConfig(1.0)
    weights = _weights(model)
    exact = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), weights)
    for m, config in settings.items():
        m.sketch = config
    errors = relative_errors(lambda: nn.functional.cross_entropy(model(x), y), weights, exact, draws)
    return saved, float(errors.mean()), float(errors.std(ddof=1) / math.sqrt(draws))


def _label(config: radgrad.SketchConfig) -> str:
    if config.exact:
        return "exact"
    bits = "" if config.bits is None else f", {config.bits} bit{'s' * (config.bits > 1)}"
    keep = "" if config.method == "quantize" else f" {config.keep:g}"
    return f"{config.method}{keep}{bits}"


def study(config: AllocationConfig, data: Tensors | None = None) -> dict[str, Any]:
    """Allocate on one batch, then judge the allocation and the uniform settings on another.

    Returns:
        ``{"config", "allocation", "rows"}``: the chosen setting per layer, and one row per
        setting that fits (``setting``, ``saved_bytes``, ``relative_variance``, ``se``),
        the allocation first.
    """
    config.check()
    torch.set_num_threads(config.threads)
    task = get_task(config.task)
    data = load_data(task, config.data) if data is None else data
    torch.manual_seed(config.seed)
    model = radgrad.convert(task.model(), keep=1.0).train()
    pick = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(sampler_seed(config.seed)))
    calib, judge = pick[:config.batch], pick[config.batch:2 * config.batch]
    cx, cy, jx, jy = data.train_x[calib], data.train_y[calib], data.train_x[judge], data.train_y[judge]
    allocation = radgrad.allocate(model, lambda: nn.functional.cross_entropy(model(cx), cy), config.budget,
                                  draws=config.calibration_draws)
    budget_bytes = math.floor(config.budget * radgrad.memory.saved_bytes(model, jx))
    settings: dict[str, nn.Module] = {"allocated": allocation.apply(copy.deepcopy(model))}
    for candidate in CANDIDATES:
        if not candidate.exact:
            uniform = copy.deepcopy(model)
            for m in uniform.modules():
                if isinstance(m, (radgrad.nn.Linear, radgrad.nn.Conv1d, radgrad.nn.Conv2d)):
                    m.sketch = candidate
            settings[f"uniform {_label(candidate)}"] = uniform
    rows = []
    for name, net in settings.items():
        if radgrad.memory.saved_bytes(net, jx) > budget_bytes:
            continue
        saved, value, se = _judge(net, jx, jy, config.draws)
        rows.append({"setting": name, "saved_bytes": saved, "relative_variance": value, "se": se})
    return {"config": asdict(config), "budget_bytes": budget_bytes,
            "allocation": {name: _label(c) for name, c in allocation.configs.items()},
            "rows": rows, "radgrad_version": radgrad.__version__, "torch_version": torch.__version__}


def render(result: dict[str, Any]) -> str:
    """The result as markdown: the allocation, then every setting that fits, best first."""
    c = result["config"]
    rows = sorted(result["rows"], key=lambda r: r["relative_variance"])
    lines = [[r["setting"], f"{r['saved_bytes'] / 1e6:.4f}", f"{r['relative_variance']:.4g} ± {r['se']:.2g}"]
             for r in rows]
    chosen = ", ".join(f"{name}: {label}" for name, label in result["allocation"].items())
    return (f"# Budget allocation: {c['task']}, budget {c['budget']:g} of the exact saved bytes, seed {c['seed']}\n\n"
            f"Allocated per layer on a calibration batch of {c['batch']} ({c['calibration_draws']} draws per "
            f"candidate): {chosen}. Judged on another batch of {c['batch']} with {c['draws']} fresh draws: "
            "relative variance E‖ĝ − g‖² / ‖g‖² over all weights (± standard error), beside every uniform "
            f"setting whose saved bytes fit the same budget ({result['budget_bytes'] / 1e6:.4f} MB).\n\n"
            + report.markdown(["setting", "saved MB", "relative variance"], lines))


def write(result: dict[str, Any], md: str, out: Path) -> list[Path]:
    """Write ``allocate.md``, ``.csv``, ``.json`` and the bar chart ``allocate.png`` into ``out``."""
    paths = report.write_outputs(out, STEM, md, result["rows"])
    paths.append(out / f"{STEM}.json")
    paths[-1].write_text(json.dumps(result, indent=1))
    rows = sorted(result["rows"], key=lambda r: r["relative_variance"])
    fig = Figure(figsize=(8, 0.35 * len(rows) + 1.5), layout="constrained")
    ax = fig.subplots()
    values = [r["relative_variance"] for r in rows]
    ax.barh(range(len(rows)), values, xerr=[2 * r["se"] for r in rows],
            color=["C3" if r["setting"] == "allocated" else "C0" for r in rows])
    ax.set_yticks(range(len(rows)), [f"{r['setting']} ({r['saved_bytes'] / 1e6:.3f} MB)" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set(xscale="log", xlabel="relative variance E‖ĝ − g‖² / ‖g‖² (error bars ±2 SE)")
    c = result["config"]
    ax.set_title(f"{c['task']}: settings within {c['budget']:g} of the exact saved bytes", fontsize=10)
    paths.append(out / f"{STEM}.png")
    fig.savefig(paths[-1], dpi=120)
    return paths
