"""Saved bytes and eager step time of a small PReLU convnet: plain, converted with its PReLUs left exact, converted.

    python benchmarks/bench_prelu.py --out results/bench_prelu.json

Two 3x3 convolutions of 32 channels, each followed by a PReLU with a slope per channel, on a
batch of 32 random 32x32 images, ``method="quantize"``. Step times are medians of interleaved
forward and backward passes, one thread.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import radgrad


def model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.PReLU(32), nn.Conv2d(32, 32, 3, padding=1),
                         nn.PReLU(32), nn.Flatten(), nn.Linear(32 * 32 * 32, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timed steps per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    plain = model()
    x = torch.randn(32, 3, 32, 32)
    models = {
        "plain": plain,
        "prelu exact": radgrad.convert(copy.deepcopy(plain), method="quantize", exclude=(nn.PReLU,)),
        "converted": radgrad.convert(copy.deepcopy(plain), method="quantize"),
    }
    saved = {name: radgrad.memory.saved_bytes(m, x) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(3 + args.rounds):
        for name, m in models.items():
            start = time.perf_counter()
            m(x).square().mean().backward()
            times[name].append(time.perf_counter() - start)
    step = {name: statistics.median(t[3:]) for name, t in times.items()}
    result = {
        "config": vars(args) | {"out": str(args.out) if args.out else None},
        "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "saved_bytes": saved, "saved_ratio": {n: b / saved["plain"] for n, b in saved.items()},
        "step_seconds": step, "step_ratio": {n: s / step["plain"] for n, s in step.items()},
    }
    for name in models:
        print(f"{name:12s} saved {saved[name]:>11,} B ({result['saved_ratio'][name]:.3f})  "
              f"step {step[name] * 1e3:6.1f} ms ({result['step_ratio'][name]:.2f}x)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
