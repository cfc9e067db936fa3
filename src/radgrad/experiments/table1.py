"""The paper's Table 1, measured: memory of each task's model at each keep fraction.

Saved memory depends on tensor shapes, never on values, so no data is loaded:
each model runs once on random inputs of its task's shape. Each cell is
measured by the ruler (:mod:`radgrad.memory`) on the model converted with
:func:`radgrad.convert` at that keep fraction (at keep 1: exact gradients,
1-bit ReLU masks, nothing stored for pooling: the paper's accounting). The
paper's numbers were computed by hand and include the weights; so does the
"total" row here (ruler + parameter bytes). MB = 10^6 bytes.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import radgrad
from radgrad.experiments import budget, report
from radgrad.experiments.tasks import PAPER_KEEPS, get_task

__all__ = ["measure_table", "render", "write", "STEM"]

STEM = "memory"


def measure_table(tasks: Sequence[str], keeps: Sequence[float], batch: int,
                  method: str = "different-sample") -> list[dict[str, Any]]:
    """One row per task and keep fraction, plus one per task for the unconverted torch model.

    Args:
        tasks: task names.
        keeps: keep fractions in (0, 1].
        batch: the batch size of the measurement.
        method: the RAD method measured below keep 1 (all of them keep the same number of values).

    Returns:
        Rows with ``task``, ``keep`` (``"torch"`` for the unconverted model),
        ``saved_bytes``, ``param_bytes``, ``saved_mb``, ``total_mb`` and ``paper_mb``
        (the paper's number, at batch 150 whatever ``batch`` is; None where it gives none).
    """
    rows = []
    for name in tasks:
        task = get_task(name)
        torch.manual_seed(0)
        model = task.model()
        params = budget.param_bytes(model)
        paper = dict(zip(PAPER_KEEPS, task.paper_memory_mb))
        cells: list[tuple[Any, int]] = [("torch", budget.saved_bytes(model, task, batch))]
        for keep in keeps:
            converted = budget.prepare(copy.deepcopy(model), "baseline" if keep == 1 else method, keep)
            cells.append((keep, budget.saved_bytes(converted, task, batch)))
        for keep, saved in cells:
            rows.append({
                "task": name, "keep": keep, "batch": batch, "saved_bytes": saved, "param_bytes": params,
                "saved_mb": round(saved / 1e6, 3), "total_mb": round((saved + params) / 1e6, 3),
                "paper_mb": paper.get(keep),
            })  # fmt: skip
    return rows


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def render(rows: list[dict[str, Any]]) -> str:
    """The table in markdown, laid out like the paper's: keep fractions as columns."""
    keeps = list(dict.fromkeys(r["keep"] for r in rows))
    header = ["task", "MB", *(k if isinstance(k, str) else f"{k:g}" for k in keeps)]
    lines = []
    for name in dict.fromkeys(r["task"] for r in rows):
        mine = {r["keep"]: r for r in rows if r["task"] == name}
        lines.append([name, "saved for backward (ruler)", *(_cell(mine[k]["saved_mb"]) for k in keeps)])
        lines.append(["", "total = ruler + weights", *(_cell(mine[k]["total_mb"]) for k in keeps)])
        lines.append(["", "paper (batch 150, by hand, with weights)", *(_cell(mine[k]["paper_mb"]) for k in keeps)])
    batch = rows[0]["batch"]
    intro = (f"Memory at batch {batch}, measured by radgrad.memory on random inputs (saved memory "
             "depends on shapes, not values). Column `torch`: the unconverted torch model; `1`: radgrad "
             "layers at keep 1 (exact gradients, 1-bit ReLU masks, nothing saved by pooling); below 1: "
             f"RAD (different-sample; project and same-sample keep as many values). Weights: "
             + ", ".join(f"{n} {r['param_bytes'] / 1e6:.3f} MB" for n, r in
                         {r["task"]: r for r in rows}.items())
             + ". MB = 10^6 bytes.\n\n")
    return intro + report.markdown(header, lines)


def write(rows: list[dict[str, Any]], md: str, out: Path) -> list[Path]:
    """Write ``memory.md``, ``memory.csv`` and ``memory.json`` into ``out``."""
    paths = report.write_outputs(out, STEM, md, rows)
    meta = {"radgrad_version": radgrad.__version__, "torch_version": torch.__version__, "rows": rows,
            "note": __doc__}
    paths.append(out / f"{STEM}.json")
    paths[-1].write_text(json.dumps(meta, indent=1))
    return paths
