"""Tables out of experiment rows: markdown for the terminal and reports, CSV for tools."""

from __future__ import annotations

import csv
import io
import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import radgrad
from radgrad.experiments.options import make_folder

__all__ = ["markdown", "csv_text", "write_outputs", "write_json", "megabytes", "environment"]


def environment() -> dict[str, Any]:
    """What a timing depends on besides the code: versions, the CPU and its vector
    instructions (torch's and inductor's kernels differ between AVX2 and AVX-512), threads."""
    return {"radgrad": radgrad.__version__, "torch": torch.__version__,
            "machine": f"{platform.machine()} {platform.processor()}".strip(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


def megabytes(nbytes: int | None, digits: int = 3) -> str:
    """``nbytes`` in MB (10**6 bytes), or "n/a" for a figure not measured."""
    return "n/a" if nbytes is None else f"{nbytes / 1e6:.{digits}f}"


def markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    """CSV with a header taken from the first row's keys."""
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def write_outputs(out: Path, stem: str, md: str, rows: Sequence[dict[str, Any]]) -> list[Path]:
    """Write ``out/stem.md`` and ``out/stem.csv`` (creating ``out``); return their paths."""
    out = make_folder(out)
    paths = [out / f"{stem}.md", out / f"{stem}.csv"]
    paths[0].write_text(md)
    paths[1].write_text(csv_text(rows))
    return paths


def write_json(path: Path, config: dict[str, Any], body: dict[str, Any], **meta: Any) -> None:
    """Write ``{"meta": ..., **body}`` to ``path`` as JSON, creating its folder.

    ``meta`` holds the ``config`` that made the results (a value JSON cannot
    hold, such as a path, as its text), :func:`environment`, and any entries
    given as keywords.
    """
    json_safe = (bool, int, float, str, list, type(None))
    config = {k: v if isinstance(v, json_safe) else str(v) for k, v in config.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": {"config": config, **environment(), **meta}, **body}, indent=2))
