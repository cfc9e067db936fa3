"""Several methods and seeds on one task: the runs, a learning-curve PNG and a summary table.

Each run is an ordinary :func:`~radgrad.experiments.train.train` run in
``out/<method>-seed<seed>/``, resumed with ``resume=True``: a finished run is
read back instead of retrained, an interrupted one continues from its
checkpoint. Writes ``out/compare.png``, ``out/compare.md`` and ``out/compare.csv``.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from radgrad.experiments import plots, report
from radgrad.experiments.tasks import get_task, load_data
from radgrad.experiments.train import RunConfig, train

__all__ = ["compare", "run_dir", "summarize", "STEM"]

STEM = "compare"


def run_dir(out: Path, method: str, seed: int) -> Path:
    """The folder of one run of a comparison."""
    return out / f"{method}-seed{seed}"


def compare(
    base: RunConfig,
    methods: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    *,
    checkpoint_seconds: float = 120.0,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], str]:
    """Run every method with every seed (skipping finished runs), then plot and tabulate.

    Args:
        base: config shared by the runs (its ``method`` and ``seed`` are replaced).
        methods, seeds: what to run.
        out: folder for the runs and the outputs.
        checkpoint_seconds, progress: passed to :func:`train`.

    Returns:
        The summary rows and the markdown table.
    """
    configs = {(m, s): dataclasses.replace(base, method=m, seed=s).resolved() for m in methods for s in seeds}
    data = load_data(get_task(base.task), base.data)
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for (method, seed), config in configs.items():
        results[method].append(train(config, run_dir(out, method, seed), resume=True, data=data,
                                     checkpoint_seconds=checkpoint_seconds, progress=progress))
    first = next(iter(configs.values()))
    rows = summarize(results)
    title = (f"{first.task}: keep {first.keep:g}, {first.iters} iterations, seeds "
             f"{', '.join(map(str, seeds))} (radgrad compare)")
    md = f"# {title}\n\n" + report.markdown(list(rows[0]), [list(r.values()) for r in rows])
    md += ("\nfinal train loss: mean of the last 5% of the iterations' minibatch losses; "
           "± is the standard deviation over seeds. Test accuracy on the fixed test subset "
           f"({results[methods[0]][0]['eval_examples']} examples) at the end. saved MB: bytes saved for backward "
           "by one forward pass (one micro-batch's when accumulating; n/a under checkpointing, whose own "
           "saved-tensor hooks hide it), measured by radgrad.memory. peak MB: the most bytes a forward and "
           "backward pass holds on top of the weights (radgrad.memory.peak; the optimizer's step, the same "
           "for every method, left out). ms/step: wall-clock time of a training step, median over seeds "
           "and steps; the runs of one comparison may have shared the machine.\n")
    report.write_outputs(out, STEM, md, rows)
    plots.learning_curves(results, title).savefig(out / f"{STEM}.png", dpi=120)
    return rows, md


def _mean_std(values: list[float], digits: int) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def summarize(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per method: batch, measured memory, final train loss and test accuracy over seeds."""
    rows = []
    for method, runs in results.items():
        rows.append({
            "method": method,
            "batch": runs[0]["batch"],
            "micro-batch": runs[0].get("micro_batch") or "",
            "saved MB": report.megabytes(runs[0]["saved_bytes"]),
            "peak MB": report.megabytes(runs[0].get("peak_bytes")),
            "saved bytes": runs[0]["saved_bytes"],
            "lr": runs[0]["config"]["lr"],
            "final train loss": _mean_std([r["final_train_loss"] for r in runs], 4),
            "test accuracy %": _mean_std([100 * r["final_test_accuracy"] for r in runs], 2),
            "seeds": len(runs),
            "it/s": f"{statistics.fmean(r['iters_per_second'] or 0.0 for r in runs):.1f}",
            "ms/step (median)": f"{1e3 * statistics.median(t for r in runs for t in r.get('step_seconds', [])):.2f}"
            if any(r.get("step_seconds") for r in runs) else "n/a",
        })  # fmt: skip
    return rows
