"""Row blocks: temporaries kept small by working a block of rows at a time, one block for symbolic sizes.

NOTE [Blocks under dynamic shapes]
    Estimates are rounded and rebuilt a block of rows at a time (NOTE
    [Unpacking in blocks] in :mod:`radgrad.functional`), a Python loop over
    the rows. ``torch.compile`` turns a size that changed between calls (a
    language model's sequence length, a last short batch) into a symbol, and
    a loop over a symbolic number of rows fixes that number again: every new
    size compiled the model anew, and after dynamo's recompile limit (8) it
    ran eagerly. So a size the compiler keeps symbolic is one block: compiled
    with dynamic shapes, a backward pass rebuilds each estimate whole, and its
    peak can exceed the blocked one by about the largest layer's input.
"""

from __future__ import annotations

from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = ["more_than", "row_blocks"]


def more_than(size: int, limit: int) -> bool:
    """``size > limit``, where it is known without a guard: False for a symbolic size whose value
    torch.compile left open (NOTE [Blocks under dynamic shapes])."""
    return statically_known_true(size > limit)


def row_blocks(rows: int, step: int) -> list[tuple[int, int]]:
    """``(lo, hi)`` ranges of at most ``step`` rows covering ``0 .. rows``; one block when the
    number of rows is symbolic (NOTE [Blocks under dynamic shapes])."""
    if not more_than(rows, step):
        return [(0, rows)]
    return [(lo, min(rows, lo + step)) for lo in range(0, rows, step)]
