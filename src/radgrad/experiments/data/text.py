"""Text found offline on every machine: the Python standard library's own source files, as bytes."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

__all__ = ["stdlib_bytes", "byte_windows"]


def stdlib_bytes(limit: int = 8_000_000, root: str | Path | None = None) -> torch.Tensor:
    """Up to ``limit`` bytes of the standard library's ``.py`` files, in sorted path order, as uint8.

    Args:
        limit: the most bytes to read.
        root: the folder to read; default the running Python's standard library.

    Raises:
        FileNotFoundError: no ``.py`` file under ``root``.
        ValueError: ``limit`` is below 2.
    """
    if limit < 2:
        raise ValueError(f"radgrad: limit must be at least 2 bytes, got {limit}")
    folder = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(folder.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        data = path.read_bytes()[: limit - size]
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    if not size:
        raise FileNotFoundError(f"radgrad: no .py files found under {folder}")
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


def byte_windows(data: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``(batch, length)`` int64 windows of ``data`` starting at uniform random offsets."""
    if data.numel() < length:
        raise ValueError(f"radgrad: {data.numel()} bytes cannot fill windows of length {length}")
    starts = torch.randint(data.numel() - length + 1, (batch, 1), generator=generator)
    return data[starts + torch.arange(length)].long()
