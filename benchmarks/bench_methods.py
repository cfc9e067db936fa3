"""Every way to train within a tenth of the saved bytes, against plain torch: `radgrad plan` on three models.

The paper's MNIST MLP and CIFAR-10 convnet at batch 150 (random inputs of the
datasets' shapes), and a deeper net where activations outweigh the weights:
eight 512-wide linear layers with ReLU at batch 1000. For each, `radgrad plan`
(radgrad.experiments.plan) measures plain torch, accumulation at the largest
micro-batch that fits, checkpointing, the paper's sampling at the largest keep
that fits, quantization at the most bits that fit and a per-layer allocation:
saved bytes, the peak of a forward and backward pass above the weights, the
time of that pass against plain torch's (median over interleaved rounds in
rotated order, one process) and the weight gradient's relative standard
deviation.

    python benchmarks/bench_methods.py --threads 1 --out results/bench_methods_1thread.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from radgrad.experiments import plan, report

TARGETS = ("mnist-mlp", "cifar-cnn", "bench_methods:deep_mlp")


def deep_mlp() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Eight 512-wide linear layers with ReLU, a batch of 1000 (the third model of this benchmark)."""
    model = nn.Sequential(*(m for _ in range(8) for m in (nn.Linear(512, 512), nn.ReLU())), nn.Linear(512, 10))
    g = torch.Generator().manual_seed(0)
    return model, (torch.randn(1000, 512, generator=g), torch.randint(10, (1000,), generator=g))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.1, help="saved bytes allowed, a fraction of plain torch's")
    parser.add_argument("--rounds", type=int, default=40, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    results = []
    for target in TARGETS:
        result = plan.plan(plan.PlanConfig(target, budget=args.budget, rounds=args.rounds, threads=args.threads))
        print(plan.render(result))
        results.append(result)
    if args.out:
        report.write_json(args.out, vars(args), {"results": results})


if __name__ == "__main__":
    main()
