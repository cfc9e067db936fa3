"""ReLU masks packed whole or in chunks: the eager step of the paper's CIFAR-10 convnet, RAD / exact.

First the peak of live tensor bytes of one forward and backward pass
(radgrad.memory.peak, weights and gradients included) of each: the exact
model, the converted one with whole masks, and with masks in chunks. Then
the step times.

One process trains the exact convnet and its converted copy (keep 0.1,
``method="sample"``) on the same minibatches of 150. Each round times a step
of the exact model, one of the converted model with its masks packed and
applied in one call per tensor, and one with them in chunks of
``radgrad.bits._CHUNK`` entries (NOTE [Masks in chunks] in
:mod:`radgrad.bits`), in an order that cycles through all six. A step is
forward, backward and Adam's update; the figures are medians of the
per-round ratios. The C library's allocator
settings (``MALLOC_*`` environment variables) are recorded with the result,
as they decide what a large temporary costs.

    python benchmarks/bench_mask_chunks.py --rounds 40 --threads 1 --out results/bench_mask_chunks.json
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import radgrad
from bench_core import BATCH, KEEP, _tensors
from radgrad.experiments import report

WHOLE = 2**62  # a chunk no mask reaches: one call per tensor
ORDERS = list(itertools.permutations(["exact", "whole", "chunks"]))  # each step after each other in turn


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    return time.perf_counter() - start


def _peak(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    def step():
        nn.functional.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    step()
    return radgrad.memory.peak(step, model).peak


def run(rounds: int, warmup: int, data: str, seed: int) -> dict:
    torch.manual_seed(seed)
    exact = radgrad.models.cifar_convnet()
    rad = radgrad.convert(copy.deepcopy(exact), keep=KEEP, method="sample", per_example=True)
    optimizers = {m: torch.optim.Adam(m.parameters(), 1e-3) for m in (exact, rad)}
    models = {"exact": exact, "whole": rad, "chunks": rad}
    images, labels = _tensors("cnn", data)
    chunk = radgrad.bits._CHUNK
    peaks = {}
    try:
        for name, model in models.items():
            radgrad.bits._CHUNK = WHOLE if name == "whole" else chunk
            peaks[name] = _peak(model, images[:BATCH], labels[:BATCH])
    finally:
        radgrad.bits._CHUNK = chunk
    seconds: dict[str, list[float]] = {name: [] for name in models}
    try:
        for i in tqdm(range(warmup + rounds), desc="convnet"):
            idx = torch.randint(len(labels), (BATCH,))
            x, y = images[idx], labels[idx]
            for name in ORDERS[i % len(ORDERS)]:
                radgrad.bits._CHUNK = WHOLE if name == "whole" else chunk
                step = _step(models[name], optimizers[models[name]], x, y)
                if i >= warmup:
                    seconds[name].append(step)
    finally:
        radgrad.bits._CHUNK = chunk
    ratio = {name: statistics.median(a / b for a, b in zip(seconds[name], seconds["exact"]))
             for name in ("whole", "chunks")}
    return {"rounds": rounds, "batch": BATCH, "keep": KEEP, "chunk": chunk,
            "malloc_environment": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
            "peak_bytes": peaks, "peak_ratio_whole": peaks["whole"] / peaks["exact"],
            "peak_ratio_chunks": peaks["chunks"] / peaks["exact"],
            "median_step_ms": {name: 1e3 * statistics.median(v) for name, v in seconds.items()},
            "step_ratio_whole": ratio["whole"], "step_ratio_chunks": ratio["chunks"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40, help="timed rounds (three steps each)")
    parser.add_argument("--warmup", type=int, default=3, help="rounds left out of the figures")
    parser.add_argument("--data", choices=["real", "random"], default="real", help="CIFAR-10 or random tensors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.rounds, args.warmup, args.data, args.seed)
    print(f"peak MB: exact {result['peak_bytes']['exact'] / 2**20:.1f}, masks whole "
          f"{result['peak_bytes']['whole'] / 2**20:.1f}, in chunks {result['peak_bytes']['chunks'] / 2**20:.1f}")
    print(f"exact step {result['median_step_ms']['exact']:.1f} ms; RAD / exact: masks whole "
          f"{result['step_ratio_whole']:.3f}, in chunks {result['step_ratio_chunks']:.3f}")
    if args.out:
        report.write_json(args.out, vars(args), result)


if __name__ == "__main__":
    main()
