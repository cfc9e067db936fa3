"""``radgrad plan``: for a model, a batch and a memory budget, measure what fits and recommend one.

The candidates are what a user short of memory can do: accumulate the batch
over the largest micro-batch that fits, checkpoint (``nn.Sequential`` models),
or let radgrad sketch the saved activations (the paper's sampling at the
largest keep that fits, quantization at the most bits that fit, and a per-layer
allocation within the budget, :func:`radgrad.allocate`). Each is measured on
the example batch: bytes saved for backward (:mod:`radgrad.memory`), the peak
of a forward and backward pass above the weights (:func:`radgrad.memory.peak`),
the time of that pass against plain torch (median over interleaved rounds),
and the relative standard deviation of the weight gradient,
``sqrt(E||g_hat - g||^2 / ||g||^2)``, over fresh draws. Checkpointing is
listed for its peak and time but not recommended: its saved bytes hide
behind its own saved-tensor hooks, so it cannot be shown to fit the budget.

NOTE [The recommendation]
    Among the candidates within the budget, an exact gradient is preferred:
    the fastest exact candidate is recommended unless a radgrad candidate is at least 1.25x faster per step
    with a relative standard deviation of at most 0.3 (a tenth of the paper's
    estimator's, and far below the noise of a small minibatch), in which case
    the fastest such radgrad candidate is. Speeds are measured on this
    machine; the rule and the figures are printed so a user can weigh them.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import radgrad
from radgrad.experiments import budget as budgets
from radgrad.experiments import options, report
from radgrad.experiments.allocation import relative_errors
from radgrad.experiments.steps import Stepper
from radgrad.experiments.steps import saved_bytes as _saved
from radgrad.experiments.tasks import TASKS, get_task

__all__ = ["PlanConfig", "load_target", "plan", "render", "write", "STEM", "SPEEDUP", "MAX_STD"]

STEM = "plan"
SPEEDUP = 1.25  # NOTE [The recommendation]
MAX_STD = 0.3
_KEEPS = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01)


@dataclass(frozen=True)
class PlanConfig:
    """The plan's settings.

    Attributes:
        target: a task name, or ``module:factory`` naming a function that returns
            ``(model, (x, y))`` or ``(model, (x, y), loss)``: a torch model, an
            example batch and optionally ``loss(output, y)`` (default: cross-entropy).
        budget: bytes saved for backward allowed, a fraction of the plain model's.
        batch: the batch of a task's example (random inputs); a factory gives its own.
        rounds: interleaved timing rounds.
        draws: gradient estimates per radgrad candidate for its standard deviation.
        seed: seeds the model, the example and every draw.
        threads: torch CPU threads.
    """

    target: str
    budget: float = 0.1
    batch: int = 150
    rounds: int = 20
    draws: int = 10
    seed: int = 0
    threads: int = 1

    def check(self) -> None:
        """Raise ValueError on a value out of range."""
        options.check_keep(self.budget, "budget")
        options.check_int("batch", self.batch)
        options.check_int("rounds", self.rounds)
        options.check_int("draws", self.draws, 2)
        options.check_seed(self.seed)
        options.check_int("threads", self.threads, 1, options.WORKERS_MAX)
        if self.target not in TASKS and ":" not in self.target:
            raise ValueError(f"radgrad: model must be a task ({', '.join(TASKS)}) or module:factory, "
                             f"got {self.target!r}")


def load_target(config: PlanConfig) -> tuple[nn.Module, Tensor, Tensor, Callable[[Tensor, Tensor], Tensor]]:
    """``(model, x, y, loss)`` for ``config.target`` (see :class:`PlanConfig`)."""
    torch.manual_seed(config.seed)
    if config.target in TASKS:
        task = get_task(config.target)
        x = budgets.example_inputs(task, config.batch)
        y = torch.randint(10, (config.batch,), generator=torch.Generator().manual_seed(config.seed))
        return task.model(), x, y, nn.functional.cross_entropy
    module_name, _, factory_name = config.target.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"radgrad: cannot load {config.target!r}: {err}") from None
    made = factory()
    if not (isinstance(made, tuple) and len(made) in (2, 3) and isinstance(made[0], nn.Module)
            and isinstance(made[1], tuple) and len(made[1]) == 2):
        raise ValueError(f"radgrad: {config.target} must return (model, (x, y)) or (model, (x, y), loss)")
    loss = made[2] if len(made) == 3 else nn.functional.cross_entropy
    return made[0], made[1][0], made[1][1], loss


def _candidates(model: nn.Module, x: Tensor, y: Tensor, loss: Callable, limit: int,
                draws: int) -> dict[str, tuple[nn.Module, Stepper, str]]:
    """name -> (model, stepper, setting) for every candidate that fits ``limit`` saved bytes (or is the reference)."""
    one = Stepper(loss=loss)
    found: dict[str, tuple[nn.Module, Stepper, str]] = {"torch (reference)": (model, one, "batch as given")}
    micro = _largest_fitting(lambda m: _saved(model, x[:m]) <= limit, len(y))
    if micro is not None and micro < len(y):
        found["accumulate"] = (model, Stepper(micro=micro, loss=loss), f"micro-batches of {micro}")
    if isinstance(model, nn.Sequential) and len(model) > 1:
        peaks = {s: Stepper(segments=s, loss=loss).peak(model, x, y) for s in range(2, len(model) + 1)}
        best = min(peaks, key=lambda s: (peaks[s], s))
        found["checkpoint"] = (model, Stepper(segments=best, loss=loss), f"{best} segments (lowest peak)")
    for keep in _KEEPS:
        rad = radgrad.convert(copy.deepcopy(model), keep=keep)
        if _saved(rad, x) <= limit:
            found["radgrad sample (the paper's)"] = (rad, one, f"keep {keep:g}")
            break
    for bits in (8, 4, 2, 1):
        rad = radgrad.convert(copy.deepcopy(model), method="quantize", bits=bits)
        if _saved(rad, x) <= limit:
            found["radgrad quantize"] = (rad, one, f"{bits} bits")
            break
    rad = radgrad.convert(copy.deepcopy(model), keep=1.0)
    exact = _saved(rad, x)
    try:
        with torch.random.fork_rng(devices=[]):
            chosen = radgrad.allocate(rad, lambda: loss(rad(x), y), min(1.0, limit / exact), draws=max(2, draws // 3))
    except ValueError:
        chosen = None
    if chosen is not None and chosen.saved_bytes <= limit:
        settings = ", ".join(f"{n}: {c.method}{'' if c.bits is None else f'/{c.bits}b'}"
                             f"{'' if c.method == 'quantize' or c.exact else f'@{c.keep:g}'}"
                             for n, c in chosen.configs.items())
        found["radgrad allocate"] = (chosen.apply(rad), one, settings)
    return found


def _largest_fitting(fits: Callable[[int], bool], n: int) -> int | None:
    """The largest ``m`` in ``1 .. n`` with ``fits(m)`` (saved bytes grow with the batch), or None."""
    if not fits(1):
        return None
    low, high = 1, n
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def _relative_std(model: nn.Module, x: Tensor, y: Tensor, loss: Callable, exact: list[Tensor], draws: int) -> float:
    weights = [p for p in model.parameters() if p.requires_grad]
    return math.sqrt(float(relative_errors(lambda: loss(model(x), y), weights, exact, draws).mean()))


def plan(config: PlanConfig) -> dict[str, Any]:
    """Measure every candidate within the budget; recommend one (NOTE [The recommendation]).

    Returns:
        ``{"config", "budget_bytes", "rows", "recommendation", "reason"}``; each row has
        ``candidate``, ``setting``, ``saved_bytes`` (None under checkpointing, whose
        hooks hide it), ``peak_bytes``, ``step_ratio`` (against plain torch) and
        ``relative_std`` (0 for exact gradients).
    """
    config.check()
    torch.set_num_threads(config.threads)
    model, x, y, loss = load_target(config)
    model.train()
    plain_saved = _saved(model, x)
    limit = math.floor(config.budget * plain_saved)
    found = _candidates(model, x, y, loss, limit, config.draws)
    weights = [p for p in model.parameters() if p.requires_grad]
    exact = torch.autograd.grad(loss(model(x), y), weights)
    times: dict[str, list[float]] = {name: [] for name in found}
    names = list(found)
    for i in range(config.rounds + 1):  # round 0 warms up
        for name in names[i % len(names):] + names[:i % len(names)]:
            net, stepper, _ = found[name]
            net.zero_grad(set_to_none=True)
            start = time.perf_counter()
            stepper.backward(net, x, y)
            if i:
                times[name].append(time.perf_counter() - start)
    rows = []
    for name, (net, stepper, setting) in found.items():
        net.zero_grad(set_to_none=True)
        rows.append({
            "candidate": name, "setting": setting,
            "saved_bytes": None if stepper.segments else _saved(net, x[:stepper.micro or len(y)]),
            "peak_bytes": stepper.peak(net, x, y),
            "step_ratio": statistics.median(t / r for t, r in zip(times[name], times["torch (reference)"])),
            "relative_std": _relative_std(net, x, y, loss, exact, config.draws) if name.startswith("radgrad") else 0.0,
        })
    name, reason = _recommend(rows, limit)
    return {"config": asdict(config), "plain_saved_bytes": plain_saved, "budget_bytes": limit, "rows": rows,
            "recommendation": name, "reason": reason, "radgrad_version": radgrad.__version__,
            "torch_version": torch.__version__}


def _recommend(rows: list[dict[str, Any]], limit: int) -> tuple[str | None, str]:
    # checkpointing's saved bytes are not measured (its own saved-tensor hooks hide them from the
    # ruler), so it cannot be shown to fit a saved-bytes budget: it is listed, not recommended
    fitting = [r for r in rows if r["candidate"] != "torch (reference)" and r["saved_bytes"] is not None]
    if not fitting:
        return None, "nothing fits the budget: raise it, or shrink the batch"
    exact = [r for r in fitting if r["relative_std"] == 0.0]
    rad = [r for r in fitting if r["relative_std"] > 0.0 and r["relative_std"] <= MAX_STD]
    best_exact = min(exact, key=lambda r: r["step_ratio"], default=None)
    best_rad = min(rad, key=lambda r: r["step_ratio"], default=None)
    if best_rad is not None and (best_exact is None or best_exact["step_ratio"] >= SPEEDUP * best_rad["step_ratio"]):
        versus = "no exact method fits" if best_exact is None else \
            f"{best_exact['step_ratio'] / best_rad['step_ratio']:.2f}x faster per step than {best_exact['candidate']}"
        return best_rad["candidate"], (f"{best_rad['candidate']} ({best_rad['setting']}): {versus}, with a gradient "
                                       f"relative std of {best_rad['relative_std']:.3f}")
    if best_exact is not None:
        return best_exact["candidate"], (f"{best_exact['candidate']} ({best_exact['setting']}): the exact gradient at "
                                         f"{best_exact['step_ratio']:.2f}x plain torch's step time; no radgrad "
                                         f"candidate is {SPEEDUP}x faster with a relative std <= {MAX_STD}")
    noisy = min(fitting, key=lambda r: r["relative_std"])
    return noisy["candidate"], (f"{noisy['candidate']} ({noisy['setting']}): the least noisy candidate that fits, "
                                f"though its relative std is {noisy['relative_std']:.3f}")


def render(result: dict[str, Any]) -> str:
    """The plan as markdown: one row per candidate, then the recommendation."""
    c = result["config"]
    lines = [[r["candidate"], r["setting"], report.megabytes(r["saved_bytes"]), report.megabytes(r["peak_bytes"]),
              f"{r['step_ratio']:.2f}", f"{r['relative_std']:.3g}"] for r in result["rows"]]
    return (f"# Plan: {c['target']}, budget {c['budget']:g} of the plain model's saved bytes "
            f"({result['budget_bytes'] / 1e6:.3f} of {result['plain_saved_bytes'] / 1e6:.3f} MB)\n\n"
            + report.markdown(["candidate", "setting", "saved MB", "peak MB", "step / torch", "gradient rel. std"],
                              lines)
            + "\npeak MB: a forward and backward pass, above the weights (checkpointing: saved bytes not "
            "measured, so not recommended). step / torch: median over "
            f"{c['rounds']} interleaved rounds. gradient rel. std: sqrt(E‖ĝ − g‖² / ‖g‖²) over {c['draws']} draws "
            "(0: exact).\n\n"
            f"**Recommended: {result['recommendation']}.** {result['reason']}.\n")


def write(result: dict[str, Any], md: str, out: Path) -> list[Path]:
    """Write ``plan.md``, ``plan.csv`` and ``plan.json`` into ``out``."""
    paths = report.write_outputs(out, STEM, md, result["rows"])
    paths.append(out / f"{STEM}.json")
    paths[-1].write_text(json.dumps(result, indent=1))
    return paths
