"""The demo: the MNIST MLP trained at (about) a tenth of the activation memory, five ways, at a glance.

    python -m radgrad.experiments.demo [--steps 5000] [--seed 0] [--out runs/demo] [--threads N]
    radgrad demo ...                    (the same)

Five runs of the training loop of ``radgrad train``
(:func:`radgrad.experiments.train.train`): ``baseline`` (batch 150, exact
gradients, the memory to beat), ``reduced-batch`` (the largest batch whose
saved memory, measured by the ruler, does not exceed the paper's RAD's; see
:func:`radgrad.experiments.budget.reduced_batch`), ``accumulate`` (batch 150's
exact gradient from micro-batches of the reduced size), ``rad-paper`` (batch
150, keep 0.1, a different sample per example) and ``rad-quantize`` (batch 150,
every saved input rounded to 2 bits). Prints the measured saved memory, the
time per step, the final training loss and the test accuracy (whole test set)
of each, and writes into ``--out``: ``demo.json`` (the config, the seed and
every run's result), ``demo.md`` and ``demo.csv`` (the table) and ``demo.png``
(learning curves against iterations and against time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

import radgrad
from radgrad.experiments import options, plots, report
from radgrad.experiments.tasks import get_task, load_data
from radgrad.experiments.train import RunConfig, train

__all__ = ["add_arguments", "run", "main", "TASK", "KEEP", "RUNS", "STEM"]

TASK = "mnist-mlp"
KEEP = 0.1
#: The demo's runs: label -> training method of the registry (:data:`radgrad.experiments.tasks.METHODS`).
RUNS = {"baseline": "baseline", "reduced-batch": "reduced-batch", "accumulate": "accumulate",
        "rad-paper": "different-sample", "rad-quantize": "quantize"}
STEM = "demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser``."""
    parser.add_argument("--steps", type=options.integer("steps"), default=5000,
                        help="training iterations per method, >= 1 (5000: about 5 minutes on one core)")
    parser.add_argument("--seed", type=options.seed(), default=0,
                        help=f"seed for weights, minibatches and RAD samples (0 to {options.SEED_MAX})")
    parser.add_argument("--out", type=options.folder(), default=Path("runs/demo"),
                        help="folder for the JSON, the table and the PNG")
    parser.add_argument("--threads", type=options.workers("threads"), default=None,
                        help="torch threads (default: torch's choice; 1 is faster on a busy machine)")


def run(args: argparse.Namespace) -> int:
    """Train the five runs with the parsed ``args``, print the table, write the outputs; return 0."""
    threads = args.threads or torch.get_num_threads()
    data = load_data(get_task(TASK))
    results: dict[str, dict[str, Any]] = {}
    for label, method in RUNS.items():
        config = RunConfig(TASK, method, keep=KEEP, iters=args.steps, seed=args.seed,
                           eval_size=len(data.test_y), threads=threads)
        results[label] = train(config, data=data)
    rows = [{"method": label, "batch": r["batch"] if r["micro_batch"] is None
             else f"{r['batch']} in micro-batches of {r['micro_batch']}",
             "saved for backward": f"{r['saved_bytes'] / 1e6:.3f} MB",
             "ms/step": f"{1e3 * statistics.median(r['step_seconds']):.2f}",
             "final train loss": f"{r['final_train_loss']:.4f}",
             "test accuracy": f"{100 * r['final_test_accuracy']:.2f}%"} for label, r in results.items()]
    title = f"MNIST MLP, {args.steps} iterations, seed {args.seed}"
    md = report.markdown(list(rows[0]), [list(row.values()) for row in rows])
    print(title)
    print(md, end="")
    config = {"task": TASK, "steps": args.steps, "seed": args.seed, "keep": KEEP, "methods": RUNS,
              "hyper": {label: [r["config"]["lr"], r["config"]["weight_decay"]] for label, r in results.items()},
              "threads": threads, "radgrad": radgrad.__version__}
    out: Path = args.out
    paths = report.write_outputs(out, STEM, f"# {title}, keep {KEEP} (radgrad demo)\n\n{md}", rows)
    paths.append(out / f"{STEM}.json")
    paths[-1].write_text(json.dumps({"config": config, "results": results}, indent=1))
    paths.append(out / f"{STEM}.png")
    figure = plots.learning_curves({label: [r] for label, r in results.items()},
                                   f"{title}, keep {KEEP} (radgrad demo)")
    figure.savefig(paths[-1], dpi=120)
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the demo (as ``radgrad demo``, so errors are reported the same way)."""
    from radgrad.experiments import cli

    return cli.main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
