"""Whole-model unbiasedness: the mean of many radgrad gradients of a real model against its exact gradient.

The tests check every op's estimate on small problems; this checks the
composition on a model of radgrad.experiments.real_models at its full size, at
the recommended setting (``method="quantize"``). In float64 with dropout off
(so the exact gradient is one fixed tensor; ``--dropout`` keeps it on and
draws the exact gradient as often, for a two-sample z-score), it draws the
converted model's gradient ``--draws`` times on one training batch and, for each parameter
tensor, projects the draws and the exact gradient on a fixed random direction:
unbiased, each tensor's z-score (mean of the projections minus the exact one,
over its standard error) is about standard normal, so the mean of the squared
z-scores is about 1 and few exceed 3. Tensors whose gradient radgrad computes
exactly, or whose gradient is zero but for rounding, are listed, not tested.

    python benchmarks/bench_real_model_bias.py --model gpt2 --draws 200 --out results/bench_real_model_bias_gpt2.json
    python benchmarks/bench_real_model_bias.py --model bert --draws 300 --dropout --out results/bench_real_model_bias_bert_dropout.json
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


def _double(batch):
    """A batch (a tensor or a tuple of them) with its floating-point tensors in float64."""
    if isinstance(batch, torch.Tensor):
        return batch.double() if batch.is_floating_point() else batch
    return tuple(_double(t) for t in batch)


def _gradient(model: nn.Module, loss) -> list[torch.Tensor]:
    params = list(model.parameters())
    grads = torch.autograd.grad(loss(model), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _projections(model: nn.Module, loss, directions: list[torch.Tensor], draws: int, desc: str) -> list[list[float]]:
    """``draws`` gradients of ``model``, each parameter's projected on its direction: one row per parameter."""
    rows: list[list[float]] = [[] for _ in directions]
    for _ in tqdm(range(draws), desc=desc):
        for row, grad, u in zip(rows, _gradient(model, loss), directions):
            row.append(float((grad * u).sum()))
    return rows


def _mean_and_error(row: list[float]) -> tuple[float, float]:
    return statistics.fmean(row), statistics.stdev(row) / len(row) ** 0.5


def measure(name: str, draws: int, seed: int, dropout: bool = False) -> dict:
    """z-scores of radgrad's mean gradient against the exact one, per parameter tensor.

    With ``dropout`` the models keep their dropout, so the exact gradient is
    random too: it is drawn as often as radgrad's, and each z-score is the
    two-sample one (difference of the means over the root of the summed
    squared standard errors).
    """
    spec = real_models.MODELS[name]
    torch.manual_seed(seed)
    exact_model = spec.build().train().double()
    if not dropout:
        _without_dropout(exact_model)
    model = radgrad.convert(copy.deepcopy(exact_model), method="quantize")
    batch = spec.batch(real_models.load_data(spec.data), torch.Generator().manual_seed(seed))
    batch = _double(batch)

    def loss(m: nn.Module) -> torch.Tensor:
        return spec.loss(m, batch)

    exact = _gradient(exact_model, loss)
    g = torch.Generator().manual_seed(seed + 1)
    directions = [torch.randn(e.shape, generator=g, dtype=torch.float64) for e in exact]
    projections = _projections(model, loss, directions, draws, f"{name} radgrad gradients")
    if dropout:
        exact_rows = _projections(exact_model, loss, directions, draws, f"{name} exact gradients")
        references = [_mean_and_error(row) for row in exact_rows]
    else:
        references = [(float((e * u).sum()), 0.0) for e, u in zip(exact, directions)]
    names = [n for n, _ in exact_model.named_parameters()]
    total = torch.cat([e.reshape(-1) for e in exact]).norm()
    tensors, exact_in_estimate, zero_gradient = [], [], []
    for n, e, (t, t_se), row in zip(names, exact, references, projections):
        mean, se = _mean_and_error(row)
        if se == 0 and t_se == 0:  # radgrad's estimate of this gradient is exact: nothing to test
            exact_in_estimate.append(n)
        elif e.norm() <= 1e-9 * total:
            # zero but for rounding (attention's key bias: softmax ignores a shift of a row's
            # scores), in the estimate too; a z-score would measure rounding, not the estimator
            zero_gradient.append(n)
        else:
            se = (se ** 2 + t_se ** 2) ** 0.5
            tensors.append({"parameter": n, "exact": t, "exact_standard_error": t_se, "mean": mean,
                            "standard_error": se, "z": (mean - t) / se, "z_of_a_10pct_bias": 0.1 * abs(t) / se})
    z2 = [t["z"] ** 2 for t in tensors]
    return {"model": name, "draws": draws, "seed": seed, "dropout": dropout, "tensors_tested": len(tensors),
            "mean_z_squared": statistics.fmean(z2), "max_abs_z": max(abs(t["z"]) for t in tensors),
            "tensors_where_a_10pct_bias_shows": sum(t["z_of_a_10pct_bias"] > 3 for t in tensors),
            "exact_in_estimate": exact_in_estimate, "zero_gradient": zero_gradient, "tensors": tensors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(real_models.MODELS), default="gpt2")
    parser.add_argument("--draws", type=int, default=200, help="radgrad gradients drawn")
    parser.add_argument("--seed", type=int, default=0, help="weights, batch and directions")
    parser.add_argument("--dropout", action="store_true",
                        help="keep dropout on, drawing the exact gradient as often as radgrad's")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if args.draws < 2:
        parser.error(f"--draws must be at least 2 (a standard error needs two), got {args.draws}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    result = measure(args.model, args.draws, args.seed, args.dropout)
    print(f"{result['model']}: {result['tensors_tested']} parameter tensors, {result['draws']} draws: "
          f"mean z^2 {result['mean_z_squared']:.2f} (about 1 if unbiased), max |z| {result['max_abs_z']:.2f}; "
          f"a 10% bias would show (|z| > 3) on {result['tensors_where_a_10pct_bias_shows']}; "
          f"left out: {len(result['exact_in_estimate'])} estimated exactly, "
          f"{len(result['zero_gradient'])} with a zero gradient")
    if args.out:
        report.write_json(args.out, vars(args), result)


if __name__ == "__main__":
    main()
