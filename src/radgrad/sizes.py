"""Decisions on sizes that torch.compile may keep symbolic: row blocks, and branches on how rows fill groups.

NOTE [Sizes under dynamic shapes]
    ``torch.compile`` turns a size that changed between calls (a language
    model's sequence length, a last short batch) into a symbol, and compiles
    one graph for every size the guards it recorded admit. A Python decision
    on that symbol adds such a guard: a loop over a symbolic number of rows
    fixes the number, and a branch on whether rows fill groups of scales
    splits the sizes into classes. Before radgrad avoided them, a converted
    GPT-2 compiled anew for every sequence length (its loops over blocks of
    rows, NOTE [Unpacking in blocks] in :mod:`radgrad.functional`), and an MLP
    with short rows for most batch sizes, until dynamo's recompile limit (8)
    sent it back to eager. So radgrad decides only on what is :func:`known`
    without a guard (always, for static sizes) and otherwise takes the way
    that holds for every size: one block of rows (a backward pass then
    rebuilds each estimate whole, and its peak can exceed the blocked one by
    about the largest layer's input), and padding to whole groups or bytes.
"""

from __future__ import annotations

from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = ["known", "row_blocks"]


def known(condition: bool) -> bool:
    """``condition`` if it is known without a guard; False for a condition on symbolic sizes whose
    truth torch.compile left open (NOTE [Sizes under dynamic shapes])."""
    return statically_known_true(condition)


def row_blocks(rows: int, step: int) -> list[tuple[int, int]]:
    """``(lo, hi)`` ranges of at most ``step`` rows covering ``0 .. rows``; one block when the
    number of rows is symbolic (NOTE [Sizes under dynamic shapes])."""
    if not known(rows > step):
        return [(0, rows)]
    return [(lo, min(rows, lo + step)) for lo in range(0, rows, step)]
