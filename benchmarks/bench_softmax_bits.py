"""Gradient noise by the bits of softmax's saved output, on a partly trained model.

A model of radgrad.experiments.real_models trains exactly for ``--steps``
steps (AdamW, its loss-run batches), long enough for attention to sharpen.
On the next batch, each converted copy (``method="quantize"``, the other
sketches at their default 2 bits) draws its gradient ``--draws`` times; the
relative error is ``mean ||g_hat - g||^2 / ||g||^2`` against the exact
gradient ``g`` of the same batch, per group of parameters (query and key
projections, value, output projection, MLP, layer norms, embeddings, head)
and over all of them. Dropout is off in these models, so ``g`` is one fixed
tensor. ``--model vit`` (attention through SDPA, which saves no
probabilities) is the reference: there softmax bits change nothing.

    python benchmarks/bench_softmax_bits.py --model vit-eager --out results/bench_softmax_bits_vit_eager.json
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import radgrad
from radgrad.experiments import real_models, report

# (substring of a parameter's name, group) in order: the first match names its group
_GROUPS = (("q_proj", "query and key"), ("k_proj", "query and key"), ("query", "query and key"),
           ("key", "query and key"), ("c_attn", "query, key and value (fused)"), ("v_proj", "value"), ("value", "value"),
           ("o_proj", "attention output"), ("attention.output", "attention output"), ("mlp", "mlp"),
           ("intermediate", "mlp"), ("output.dense", "mlp"), ("layernorm", "layer norms"),
           ("ln_", "layer norms"), ("LayerNorm", "layer norms"), ("embeddings", "embeddings"),
           ("wte", "embeddings"), ("wpe", "embeddings"))


def _group(name: str) -> str:
    return next((group for key, group in _GROUPS if key in name), "head and other")


def trained(name: str, steps: int, lr: float, seed: int) -> tuple[nn.Module, real_models.Spec, object]:
    """The exact model after ``steps`` AdamW steps, and the next training batch."""
    model, spec = real_models.build(name, "exact", seed)
    data = real_models.load_data(spec.data)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    batches = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc=f"{name}: exact training"):
        loss = spec.loss(model, spec.batch(data, batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model, spec, spec.batch(data, batches)


def _squares(grads, names: list[str]) -> dict[str, float]:
    """Summed squares of ``grads`` by parameter group."""
    out: dict[str, float] = {}
    for name, grad in zip(names, grads):
        out[_group(name)] = out.get(_group(name), 0.0) + float(grad.detach().pow(2).sum())
    return out


def measure(name: str, steps: int, lr: float, seed: int, draws: int, softmax_bits: list[int]) -> dict:
    model, spec, batch = trained(name, steps, lr, seed)
    names = [n for n, _ in model.named_parameters()]
    exact_loss = spec.loss(model, batch)
    exact = torch.autograd.grad(exact_loss, list(model.parameters()))
    norms = _squares(exact, names)
    rows = []
    for bits in softmax_bits:
        converted = radgrad.convert(copy.deepcopy(model), method="quantize", softmax_bits=bits)
        params = list(converted.parameters())
        torch.manual_seed(seed + 1)  # every setting draws from the same generator state
        errors: dict[str, float] = {}
        for _ in tqdm(range(draws), desc=f"softmax_bits={bits}"):
            grads = torch.autograd.grad(spec.loss(converted, batch), params)
            for group, value in _squares([g - e for g, e in zip(grads, exact)], names).items():
                errors[group] = errors.get(group, 0.0) + value / draws
        relative = {group: errors[group] / norms[group] for group in norms if norms[group] > 0}
        relative["all"] = sum(errors.values()) / sum(norms.values())
        rows.append({"softmax_bits": bits, "relative_error": relative})
    return {"model": name, "exact_loss_at_batch": exact_loss.item(), "rows": rows}


def trained_model_parser(doc: str, model: str, draws: str) -> argparse.ArgumentParser:
    """The options of a measurement on a model trained by :func:`trained`: model, steps, rate, seed,
    draws, threads and output file."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=model, choices=list(real_models.MODELS))
    parser.add_argument("--steps", type=int, default=150, help="exact training steps before measuring")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draws", type=int, default=12, help=draws)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser


def main() -> None:
    parser = trained_model_parser(__doc__, "vit-eager", "radgrad gradients per setting")
    parser.add_argument("--softmax-bits", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = measure(args.model, args.steps, args.lr, args.seed, args.draws, args.softmax_bits)
    groups = list(result["rows"][0]["relative_error"])
    print(f"{args.model} after {args.steps} exact steps: relative gradient error by softmax bits")
    print(report.markdown(["softmax bits", *groups], [[row["softmax_bits"], *(f"{row['relative_error'][g]:.3f}"
                                                                             for g in groups)]
                                                       for row in result["rows"]]))
    if args.out:
        report.write_json(args.out, vars(args), result)


if __name__ == "__main__":
    main()
