"""Figures of the experiments, drawn on ``matplotlib.figure.Figure`` (no pyplot state)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

__all__ = ["smooth", "learning_curves", "variance_bars"]


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average; the first ``window - 1`` points average what exists so far."""
    x = np.asarray(values, dtype=float)
    if window <= 1 or len(x) == 0:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def learning_curves(runs: Mapping[str, Sequence[dict[str, Any]]], title: str) -> Figure:
    """Training loss and test accuracy against iteration, one colour per method.

    Args:
        runs: method name -> results of its seeds (dicts as written by
            :func:`radgrad.experiments.train.train`).
        title: figure title.

    Lines are the mean over seeds, bands the min-max range; the training loss
    is a moving average over 2% of the run, on a log scale.
    """
    fig = Figure(figsize=(17, 4.6), layout="constrained")
    loss_ax, clock_ax, acc_ax = fig.subplots(1, 3)
    for i, (method, results) in enumerate(runs.items()):
        color = f"C{i}"
        first = results[0]
        length = min(len(r["losses"]) for r in results)
        window = max(1, length // 50)
        curves = np.stack([smooth(r["losses"][:length], window) for r in results])
        its = np.arange(1, length + 1)
        memory = f"peak {first['peak_bytes'] / 1e6:.3g} MB" if first.get("peak_bytes") is not None \
            else f"saved {first['saved_bytes'] / 1e6:.3g} MB"
        label = f"{method} (batch {first['batch']}, {memory}, {len(results)} seed{'s' * (len(results) > 1)})"
        loss_ax.plot(its, curves.mean(0), color=color, lw=1.3, label=label)
        if len(results) > 1:
            loss_ax.fill_between(its, curves.min(0), curves.max(0), color=color, alpha=0.2, lw=0)
        if all(r.get("step_seconds") for r in results):  # the same curve against training time
            clock = np.mean([np.cumsum(r["step_seconds"][:length]) for r in results], axis=0)
            clock_ax.plot(clock, curves.mean(0), color=color, lw=1.3, label=method)
        steps = [e["iteration"] for e in first["evals"]]
        acc = np.array([[e["test_accuracy"] for e in r["evals"][: len(steps)]] for r in results])
        acc_ax.plot(steps, acc.mean(0), color=color, marker="o", ms=3, lw=1.2, label=method)
        if len(results) > 1:
            acc_ax.fill_between(steps, acc.min(0), acc.max(0), color=color, alpha=0.2, lw=0)
    loss_ax.set(xlabel="iteration", ylabel="training loss (moving average over 2% of the run)", yscale="log")
    clock_ax.set(xlabel="training seconds (steps only, mean over seeds)", ylabel="training loss", yscale="log")
    acc_ax.set(xlabel="iteration", ylabel="test accuracy (fixed test subset)")
    for ax in (loss_ax, clock_ax, acc_ax):
        ax.grid(True, which="both", alpha=0.3)
    loss_ax.legend(fontsize=8, title="mean over seeds, band: min-max", title_fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def variance_bars(values: Mapping[str, Mapping[str, tuple[float, float]]], title: str, ylabel: str) -> Figure:
    """Grouped bars on a log scale: one group per layer, one bar per estimator.

    Args:
        values: estimator -> layer -> (value, standard error); error bars show +-2 SE.
        title, ylabel: labels.
    """
    estimators = list(values)
    layers = list(next(iter(values.values())))
    fig = Figure(figsize=(max(7.0, 1.6 * len(layers) + 3), 4.8), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(estimators)
    for i, name in enumerate(estimators):
        x = np.arange(len(layers)) + (i - (len(estimators) - 1) / 2) * width
        v = np.array([values[name][layer][0] for layer in layers])
        se = np.array([values[name][layer][1] for layer in layers])
        ax.bar(x, v, width, yerr=2 * se, capsize=2, label=name, color=f"C{i}", error_kw={"lw": 0.8})
    ax.set_xticks(np.arange(len(layers)), layers, rotation=15, fontsize=8)
    ax.set(yscale="log", ylabel=ylabel)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7, ncols=2)
    ax.set_title(title, fontsize=10)
    return fig
