"""Eager time of packing one tensor with method="quantize", and of a normalization's two sketches.

For each shape (one row per example and channel, as a convolution or batch
norm packs a feature map): the median time of ``radgrad.sketch.pack`` and of
``radgrad.sketch.pack_copies(copies=2)`` against two ``pack`` calls, the
calls interleaved in one process. It runs against radgrad versions before
``pack_copies`` too (its columns then read n/a), to compare ``pack`` across
commits.

    python benchmarks/bench_quantize.py --threads 1 --out results/bench_quantize_1thread.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import interleave
import radgrad
from radgrad.experiments import report
from radgrad.sketch import pack

pack_copies = getattr(radgrad.sketch, "pack_copies", None)

# The HF ResNet's feature maps at batch 32 and 32 px (stem, stages 1-4), and a transformer's hidden states.
SHAPES = [(32, 32, 16, 16), (32, 32, 8, 8), (32, 64, 4, 4), (32, 128, 2, 2), (32, 256, 1, 1), (8, 256, 1024)]


def measure(shape: tuple[int, ...], rounds: int, bits: int) -> dict:
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
    return {"shape": list(shape), "bits": bits, "median_us": us, "copies_over_two_packs": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=300, help="interleaved timing rounds")
    parser.add_argument("--bits", type=int, default=2, choices=radgrad.BITS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    print("| shape | pack us | two packs us | pack_copies(2) us | ratio |")
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        r = measure(shape, args.rounds, args.bits)
        us = r["median_us"]
        if pack_copies is None:
            print(f"| {'x'.join(map(str, shape))} | {us['pack']:.0f} | n/a | n/a | n/a |")
        else:
            print(f"| {'x'.join(map(str, shape))} | {us['pack']:.0f} | {us['two_packs']:.0f} | "
                  f"{us['pack_copies_2']:.0f} | {r['copies_over_two_packs']:.2f} |")
        results.append(r)
    if args.out:
        report.write_json(args.out, vars(args), {"results": results})


if __name__ == "__main__":
    main()
