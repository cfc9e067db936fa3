"""Timing several ways of one pass in one process, interleaved round by round.

The benchmarks that compare radgrad's code paths switch between them by
setting a module attribute (the function that chooses the path) for each way;
those that compare different calls give no module.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any


def median_seconds(ways: dict[str, tuple[Callable[[], Any], Any]], module: ModuleType | None = None,
                   attribute: str | None = None, rounds: int = 10, warmup: int = 2) -> dict[str, float]:
    """The median seconds of each way's ``run()`` over ``rounds`` interleaved rounds.

    A way is ``(run, value)``: ``module.attribute`` is ``value`` while ``run`` runs,
    and is restored afterwards; without a ``module`` nothing is switched and
    ``value`` is ignored. The first ``warmup`` rounds (compiling every way) are
    not timed.
    """
    original = getattr(module, attribute) if module is not None else None
    times: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for r in range(warmup + rounds):
            for name, (run, value) in ways.items():
                if module is not None:
                    setattr(module, attribute, value)
                start = time.perf_counter()
                run()
                if r >= warmup:
                    times[name].append(time.perf_counter() - start)
    finally:
        if module is not None:
            setattr(module, attribute, original)
    return {name: statistics.median(t) for name, t in times.items()}
