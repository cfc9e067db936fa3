"""The compression schemes behind :func:`radgrad.pack`, one per file.

Each scheme turns the rows of a tensor (NOTE [Sketch layout] in
:mod:`radgrad.sketch`) into what is stored, and back into an unbiased
estimate: :mod:`.sample` (uniform positions), :mod:`.norm` (positions drawn
in proportion to magnitude), :mod:`.project` (random sign projections) and
:mod:`.quantize` (stochastic rounding to a few bits, applied to whatever a
scheme keeps, or to whole rows).
"""
