"""Timing several ways of one pass in one process, interleaved round by round.

The benchmarks that compare radgrad's code paths switch between them by
setting a module attribute (the function that chooses the path) for each way.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any


def median_seconds(ways: dict[str, tuple[Callable[[], Any], Any]], module: ModuleType, attribute: str,
                   rounds: int, warmup: int = 2) -> dict[str, float]:
    """The median seconds of each way's ``run()`` over ``rounds`` interleaved rounds.

    A way is ``(run, value)``: ``module.attribute`` is ``value`` while ``run`` runs,
    and is restored afterwards. The first ``warmup`` rounds (compiling every way)
    are not timed.
    """
    original = getattr(module, attribute)
    times: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for r in range(warmup + rounds):
            for name, (run, value) in ways.items():
                setattr(module, attribute, value)
                start = time.perf_counter()
                run()
                if r >= warmup:
                    times[name].append(time.perf_counter() - start)
    finally:
        setattr(module, attribute, original)
    return {name: statistics.median(t) for name, t in times.items()}
