"""Eager time of packing one tensor with method="quantize", and of a normalization's two sketches.

For each shape (one row per example and channel, as a convolution or batch
norm packs a feature map): the median time of ``radgrad.sketch.pack`` and of
``radgrad.sketch.pack_copies(copies=2)`` against two ``pack`` calls, the
calls interleaved in one process. It runs against radgrad versions before
``pack_copies`` too (its columns then read n/a), to compare ``pack`` across
commits. ``--baseline SRC`` also times the quantization itself and the
rebuilding of its estimate against ``SRC/radgrad/estimators/quantize.py``
(the ``src`` folder of another checkout, e.g. a ``git worktree`` of an older
commit) loaded beside this one and interleaved with it in the same process:
across processes this host's timings move by more than most changes gain.
Every row also counts the random numbers one ``pack`` draws.

    python benchmarks/bench_quantize.py --threads 1 --out results/bench_quantize_1thread.json
    python benchmarks/bench_quantize.py --threads 1 --baseline /tmp/old/src --out results/bench_quantize_against.json
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from types import ModuleType

import torch

import interleave
import radgrad
from radgrad import rng
from radgrad.estimators import quantize
from radgrad.experiments import report
from radgrad.sketch import pack

pack_copies = getattr(radgrad.sketch, "pack_copies", None)

# The HF ResNet's feature maps at batch 32 and 32 px (stem, stages 1-4), and a transformer's hidden states.
SHAPES = [(32, 32, 16, 16), (32, 32, 8, 8), (32, 64, 4, 4), (32, 128, 2, 2), (32, 256, 1, 1), (8, 256, 1024)]


def _load_baseline(src: Path) -> ModuleType:
    """``src/radgrad/estimators/quantize.py`` as a module of its own, beside this checkout's."""
    path = src / "radgrad" / "estimators" / "quantize.py"
    if not path.is_file():
        raise SystemExit(f"bench_quantize: --baseline must be a src folder holding {path.relative_to(src)}, "
                         f"got {src}")
    spec = importlib.util.spec_from_file_location("baseline_quantize", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _numbers_drawn(x: torch.Tensor, config: radgrad.SketchConfig) -> int:
    """How many random numbers one ``pack`` of ``x`` draws."""
    drawn, original = [], rng.draw

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        drawn.append(out.numel())
        return out

    rng.draw = counting
    try:
        pack(x, config, batch_dims=2)
    finally:
        rng.draw = original
    return sum(drawn)


def _against(baseline: ModuleType, x: torch.Tensor, bits: int, rounds: int) -> dict:
    """Median seconds of this checkout's quantization over the baseline's (one and two copies), and of
    its rebuilding of the estimate."""
    rows = x.reshape(x.shape[0] * x.shape[1], -1)
    ratios = {}
    for copies in (1, 2):
        if copies == 1 or hasattr(baseline, "quantize_copies"):
            old = ((lambda: baseline.quantize_copies(rows, bits, x, None, copies)) if copies > 1
                   else (lambda: baseline.quantize(rows, bits, x, None)))
            new = lambda: quantize.quantize_copies(rows, bits, x, None, copies)  # noqa: E731
            seconds = interleave.median_seconds({"new": (new, None), "old": (old, None)}, rounds=rounds, warmup=10)
            ratios[f"copies_{copies}"] = seconds["new"] / seconds["old"]
    codes, scale = quantize.quantize(rows, bits, x, None)  # both versions store the same bytes
    n = rows.shape[1]
    seconds = interleave.median_seconds({
        "new": (lambda: quantize.dequantize(codes, scale, bits, n, x.dtype), None),
        "old": (lambda: baseline.dequantize(codes, scale, bits, n, x.dtype), None)}, rounds=rounds, warmup=10)
    ratios["unpack"] = seconds["new"] / seconds["old"]
    return ratios


def measure(shape: tuple[int, ...], rounds: int, bits: int, baseline: ModuleType | None = None) -> dict:
    x = torch.randn(shape)
    config = radgrad.SketchConfig(method="quantize", bits=bits)
    calls = {
        "pack": lambda: pack(x, config, batch_dims=2),
    }
    if pack_copies is not None:
        calls["two_packs"] = lambda: (pack(x, config, batch_dims=2), pack(x, config, batch_dims=2))
        calls["pack_copies_2"] = lambda: pack_copies(x, config, batch_dims=2, copies=2)
    seconds = interleave.median_seconds({name: (fn, None) for name, fn in calls.items()}, rounds=rounds, warmup=10)
    us = {name: t * 1e6 for name, t in seconds.items()}
    ratio = us["pack_copies_2"] / us["two_packs"] if pack_copies is not None else None
    against = _against(baseline, x, bits, rounds) if baseline is not None else None
    return {"shape": list(shape), "bits": bits, "median_us": us, "copies_over_two_packs": ratio,
            "numbers_drawn": _numbers_drawn(x, config), "over_baseline": against}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=300, help="interleaved timing rounds")
    parser.add_argument("--bits", type=int, default=2, choices=radgrad.BITS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--baseline", type=Path,
                        help="another checkout's src folder: also time its quantization against this one's")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    baseline = _load_baseline(args.baseline) if args.baseline is not None else None
    results = []
    print("| shape | numbers drawn | pack us | two packs us | pack_copies(2) us | ratio "
          "| over baseline: 1 copy / 2 copies / unpack |")
    print("|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        r = measure(shape, args.rounds, args.bits, baseline)
        us, against = r["median_us"], r["over_baseline"] or {}
        cells = [f"{us['pack']:.0f}", "n/a", "n/a", "n/a"]
        if pack_copies is not None:
            cells[1:] = [f"{us['two_packs']:.0f}", f"{us['pack_copies_2']:.0f}", f"{r['copies_over_two_packs']:.2f}"]
        vs = " / ".join(f"{against[k]:.2f}" if k in against else "n/a" for k in ("copies_1", "copies_2", "unpack"))
        print(f"| {'x'.join(map(str, shape))} | {r['numbers_drawn']} | {' | '.join(cells)} | {vs} |")
        results.append(r)
    if args.out:
        report.write_json(args.out, vars(args), {"results": results})


if __name__ == "__main__":
    main()
