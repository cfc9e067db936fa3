"""What the experiments' options allow: one set of checks for the command lines and the configs.

Each ``check_*`` function returns the value it is given if the option allows it and
raises :class:`OptionError` (a :class:`ValueError`) otherwise, with a message that
names the option and says what it allows::

    radgrad: seed must be an integer from 0 to 9223372036854775807, got -1

The argparse ``type`` factories (:func:`integer`, :func:`number`, :func:`keep`,
:func:`seed`, :func:`workers`, :func:`folder`) parse the text and run the same check, so a bad command-line
option fails while the arguments are parsed, before any data is loaded or any
run starts; the message then quotes the text as typed.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

import radgrad

__all__ = ["OptionError", "SEED_MAX", "WORKERS_MAX", "check_int", "check_number", "check_keep", "check_seed",
           "check_folder", "make_folder", "integer", "number", "keep", "seed", "workers", "folder"]

#: Seeds go to torch's generators and numpy's ``SeedSequence``: non-negative, within int64.
SEED_MAX = 2**63 - 1
#: Upper bound of ``--threads`` and ``--jobs`` (torch and the process pool take the count as given).
WORKERS_MAX = 1024


class OptionError(ValueError):
    """A value an option does not allow.

    Attributes:
        name: the option, as its command-line flag without the dashes.
        allowed: what the option allows, e.g. ``"an integer >= 1"``.
        got: the rejected value.
        reason: why, when ``allowed`` alone does not say it.
    """

    def __init__(self, name: str, allowed: str, got: object, reason: str | None = None) -> None:
        self.name, self.allowed, self.got, self.reason = name, allowed, got, reason
        super().__init__(self.message(got))

    def message(self, got: object) -> str:
        """The message, quoting ``got`` as the rejected value."""
        why = f" ({self.reason})" if self.reason else ""
        return f"radgrad: {self.name} must be {self.allowed}, got {got!r}{why}"


def _int_rule(minimum: int, maximum: int | None) -> str:
    return f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"


def _number_rule(low: float, closed: bool, high: float | None) -> str:
    if high is None:
        return f"a finite number {'>=' if closed else '>'} {low:g}"
    return f"in {'[' if closed else '('}{low:g}, {high:g}]"


def check_int(name: str, value: object, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` if it is an integer (not a bool) in ``[minimum, maximum]``; else :class:`OptionError`."""
    if (isinstance(value, bool) or not isinstance(value, int) or value < minimum
            or (maximum is not None and value > maximum)):
        raise OptionError(name, _int_rule(minimum, maximum), value)
    return value


def check_number(name: str, value: object, low: float = 0.0, *, closed: bool = False,
                 high: float | None = None) -> float:
    """``value`` as a float if it is a finite real number above ``low`` (or equal to it, if
    ``closed``) and at most ``high``; else :class:`OptionError`. NaN and infinities never pass."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value >= low if closed else value > low) and (high is None or value <= high))
    if not ok:
        raise OptionError(name, _number_rule(low, closed, high), value)
    return float(value)  # type: ignore[arg-type]


def check_keep(value: object, name: str = "keep") -> float:
    """A keep fraction, as a float: whatever :class:`radgrad.SketchConfig` accepts, a finite number in (0, 1].

    The one check of keep fractions in the experiments: it asks :class:`radgrad.SketchConfig`
    (the library's rule) and turns its ``TypeError``/``ValueError`` into an :class:`OptionError`.
    """
    try:
        if value is None:  # SketchConfig reads None as "the method's default"
            raise ValueError
        return radgrad.SketchConfig(value).keep  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise OptionError(name, _number_rule(0.0, False, 1.0), value) from None


def check_seed(value: object, name: str = "seed") -> int:
    """A seed: an integer from 0 to :data:`SEED_MAX`."""
    return check_int(name, value, 0, SEED_MAX)


def check_folder(value: str | os.PathLike[str], name: str = "out") -> Path:
    """``value`` as a Path if it is a folder or can be created as one: no file at it or above it."""
    path = Path(value)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise OptionError(name, "a folder or a path where one can be created", str(path),
                                  f"{candidate} is a file")
            break
    return path


def make_folder(value: str | os.PathLike[str], name: str = "out") -> Path:
    """Create the folder ``value`` (and its parents) if needed; :class:`OptionError` if it cannot be one."""
    path = check_folder(value, name)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OptionError(name, "a folder radgrad can create", str(path), err.strerror or str(err)) from None
    return path


def _argparse_type(name: str, parse: Callable[[str], object], check: Callable[[object], object]) -> Callable:
    """An argparse ``type``: ``check(parse(text))``; its error quotes ``text`` as typed."""

    def convert(text: str) -> object:
        try:
            return check(parse(text))
        except OptionError as err:
            raise argparse.ArgumentTypeError(err.message(text)) from None

    convert.__name__ = name  # argparse names the type in some messages
    return convert


def _to_int(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text  # not an integer: the check rejects it and says what is allowed


def _to_float(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def integer(name: str, minimum: int = 1, maximum: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in ``[minimum, maximum]`` (see :func:`check_int`)."""
    return _argparse_type(name, _to_int, lambda v: check_int(name, v, minimum, maximum))


def number(name: str, low: float = 0.0, *, closed: bool = False, high: float | None = None) -> Callable[[str], float]:
    """argparse type: a finite number above ``low`` (see :func:`check_number`)."""
    return _argparse_type(name, _to_float, lambda v: check_number(name, v, low, closed=closed, high=high))


def keep(name: str = "keep") -> Callable[[str], float]:
    """argparse type: a keep fraction in (0, 1]."""
    return _argparse_type(name, _to_float, lambda v: check_keep(v, name))


def seed(name: str = "seed") -> Callable[[str], int]:
    """argparse type: a seed, an integer from 0 to :data:`SEED_MAX`."""
    return _argparse_type(name, _to_int, lambda v: check_seed(v, name))


def workers(name: str) -> Callable[[str], int]:
    """argparse type: a thread or process count, an integer from 1 to :data:`WORKERS_MAX`."""
    return integer(name, 1, WORKERS_MAX)


def folder(name: str = "out") -> Callable[[str], Path]:
    """argparse type: a path that is, or can become, a folder (see :func:`check_folder`)."""
    return _argparse_type(name, str, lambda v: check_folder(v, name))  # type: ignore[arg-type]
