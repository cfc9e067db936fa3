"""Whole-model unbiasedness: the mean of many radgrad gradients of a real model against its exact gradient.

The tests check every op's estimate on small problems; this checks the
composition on a model of radgrad.experiments.real_models at its full size, at
the recommended setting (``method="quantize"``). In float64 with dropout off
(so the exact gradient is one fixed tensor), it draws the converted model's
gradient ``--draws`` times on one training batch and, for each parameter
tensor, projects the draws and the exact gradient on a fixed random direction:
unbiased, each tensor's z-score (mean of the projections minus the exact one,
over its standard error) is about standard normal, so the mean of the squared
z-scores is about 1 and few exceed 3. Tensors whose gradient radgrad computes
exactly, or whose gradient is zero but for rounding, are listed, not tested.

    python benchmarks/bench_real_model_bias.py --model gpt2 --draws 200 --out results/bench_real_model_bias_gpt2.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import radgrad
from radgrad.experiments import real_models, report


def _without_dropout(model: nn.Module) -> nn.Module:
    """``model`` with every dropout probability 0: modules', and attention's floats named after it."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    return model


def _gradient(model: nn.Module, loss) -> list[torch.Tensor]:
    params = list(model.parameters())
    grads = torch.autograd.grad(loss(model), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def measure(name: str, draws: int, seed: int) -> dict:
    spec = real_models.MODELS[name]
    torch.manual_seed(seed)
    exact_model = _without_dropout(spec.build().train().double())
    model = radgrad.convert(copy.deepcopy(exact_model), method="quantize")
    batch = spec.batch(real_models.load_data(spec.data), torch.Generator().manual_seed(seed))
    batch = tuple(t.double() if t.is_floating_point() else t for t in batch)

    def loss(m: nn.Module) -> torch.Tensor:
        return spec.loss(m, batch)

    exact = _gradient(exact_model, loss)
    g = torch.Generator().manual_seed(seed + 1)
    directions = [torch.randn(e.shape, generator=g, dtype=torch.float64) for e in exact]
    projections: list[list[float]] = [[] for _ in exact]
    for _ in tqdm(range(draws), desc=f"{name} gradients"):
        for row, grad, u in zip(projections, _gradient(model, loss), directions):
            row.append(float((grad * u).sum()))
    names = [n for n, _ in exact_model.named_parameters()]
    total = torch.cat([e.reshape(-1) for e in exact]).norm()
    tensors, exact_in_estimate, zero_gradient = [], [], []
    for n, e, u, row in zip(names, exact, directions, projections):
        se = statistics.stdev(row) / draws ** 0.5
        if se == 0:  # radgrad's estimate of this gradient is exact: nothing to test
            exact_in_estimate.append(n)
        elif e.norm() <= 1e-9 * total:
            # zero but for rounding (attention's key bias: softmax ignores a shift of a row's
            # scores), in the estimate too; a z-score would measure rounding, not the estimator
            zero_gradient.append(n)
        else:
            t = float((e * u).sum())
            tensors.append({"parameter": n, "exact": t, "mean": statistics.fmean(row),
                            "standard_error": se, "z": (statistics.fmean(row) - t) / se})
    z2 = [t["z"] ** 2 for t in tensors]
    return {"model": name, "draws": draws, "seed": seed, "tensors_tested": len(tensors),
            "mean_z_squared": statistics.fmean(z2), "max_abs_z": max(abs(t["z"]) for t in tensors),
            "exact_in_estimate": exact_in_estimate, "zero_gradient": zero_gradient, "tensors": tensors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(real_models.MODELS), default="gpt2")
    parser.add_argument("--draws", type=int, default=200, help="radgrad gradients drawn")
    parser.add_argument("--seed", type=int, default=0, help="weights, batch and directions")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if args.draws < 2:
        parser.error(f"--draws must be at least 2 (a standard error needs two), got {args.draws}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    result = measure(args.model, args.draws, args.seed)
    print(f"{result['model']}: {result['tensors_tested']} parameter tensors, {result['draws']} draws: "
          f"mean z^2 {result['mean_z_squared']:.2f} (about 1 if unbiased), max |z| {result['max_abs_z']:.2f}; "
          f"left out: {len(result['exact_in_estimate'])} estimated exactly, "
          f"{len(result['zero_gradient'])} with a zero gradient")
    if args.out:
        report.write_json(args.out, vars(args), result)


if __name__ == "__main__":
    main()
