"""The down projection of a gated MLP: its weight gradient from 2 bits of the product, or from the factors.

A gated MLP computes ``down(act(gate(x)) * up(x))``. The product saves a
2-bit sketch of each factor for its own backward; the down projection's
weight gradient ``grad^T (a * b)`` can read either a 2-bit sketch of the
product ``a * b`` (what a linear layer saves of its input) or the product
of the factors' sketches (NOTE [A product's sketches serve the next layer]
in radgrad.functional._source). A model of radgrad.experiments.real_models
trains exactly for ``--steps`` steps; on the next batch, every MLP layer's
factors and output gradient are captured, and each estimate of the down
projection's weight gradient is drawn ``--draws`` times: the relative
squared error ``mean ||G_hat - G||^2 / ||G||^2`` per layer, and the 4-bit
sketch of the product for scale.

    python benchmarks/bench_gated_products.py --model llama --out results/bench_gated_products_llama.json
"""

from __future__ import annotations

import torch

import radgrad
from bench_softmax_bits import trained, trained_model_parser
from radgrad.experiments import real_models, report


def _captured(model: torch.nn.Module, spec: real_models.Spec, batch) -> list[dict[str, torch.Tensor]]:
    """Per MLP layer: the factors ``a`` (activated gate) and ``b`` (up), and the down projection's
    output gradient ``g``, each as rows of its last dimension."""
    layers = [m for m in model.modules() if all(hasattr(m, n) for n in ("act_fn", "up_proj", "down_proj"))]
    store: list[dict[str, torch.Tensor]] = [{} for _ in layers]
    for found, mlp in zip(store, layers):
        mlp.act_fn.register_forward_hook(lambda m, i, o, found=found: found.__setitem__("a", o.detach()))
        mlp.up_proj.register_forward_hook(lambda m, i, o, found=found: found.__setitem__("b", o.detach()))
        mlp.down_proj.register_full_backward_hook(lambda m, gi, go, found=found: found.__setitem__("g", go[0]))
    spec.loss(model, batch).backward()
    return [{k: t.reshape(-1, t.shape[-1]) for k, t in found.items()} for found in store]


def measure(name: str, steps: int, lr: float, seed: int, draws: int) -> dict:
    model, spec, batch = trained(name, steps, lr, seed)
    layers = _captured(model, spec, batch)
    two, four = (radgrad.SketchConfig(method="quantize", bits=b) for b in (2, 4))

    def estimate(t: torch.Tensor, config: radgrad.SketchConfig) -> torch.Tensor:
        return radgrad.unpack(radgrad.pack(t, config, batch_dims=1))

    ways = {"2-bit product": lambda a, b: estimate(a * b, two),
            "product of 2-bit factors": lambda a, b: estimate(a, two) * estimate(b, two),
            "4-bit product": lambda a, b: estimate(a * b, four)}
    torch.manual_seed(seed + 1)
    rows = []
    for i, layer in enumerate(layers):
        a, b, g = layer["a"], layer["b"], layer["g"]
        exact = g.T @ (a * b)
        row = {"layer": i}
        for way, fn in ways.items():
            row[way] = sum(float((g.T @ fn(a, b) - exact).pow(2).sum()) for _ in range(draws)) / draws \
                / float(exact.pow(2).sum())
        rows.append(row)
    return {"model": name, "steps": steps, "lr": lr, "seed": seed, "draws": draws, "rows": rows}


def main() -> None:
    args = trained_model_parser(__doc__, "llama", "estimates per layer and way").parse_args()
    torch.set_num_threads(args.threads)
    result = measure(args.model, args.steps, args.lr, args.seed, args.draws)
    ways = [k for k in result["rows"][0] if k != "layer"]
    print(f"{args.model} after {args.steps} exact steps: relative squared error of the down projection's gradient")
    print(report.markdown(["layer", *ways], [[row["layer"], *(f"{row[w]:.3f}" for w in ways)]
                                             for row in result["rows"]]))
    if args.out:
        report.write_json(args.out, vars(args), result)


if __name__ == "__main__":
    main()
