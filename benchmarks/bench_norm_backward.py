"""Compiled batch and layer norm backward passes: codes read by plane, or in the input's shape.

A RAD normalization's backward rebuilds two sketches of its normalized input
inside reductions that inductor fuses with the dequantization. Read in the
input's shape, each entry's byte index divides by the plane width; read by
plane (NOTE [Reading codes by plane] in radgrad.functional._norm) it does
not. For each shape this times the compiled forward and backward pass of the
RAD op (2-bit codes, method="quantize") both ways, and plain torch's for
reference: medians over interleaved rounds, one process. The way that is not
radgrad's default is selected by replacing ``radgrad.functional._norm._planes``.

    python benchmarks/bench_norm_backward.py --threads 1 --out results/bench_norm_backward_1thread.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import interleave
import radgrad
import radgrad.functional as RF
from radgrad.experiments import report
from radgrad.functional import _norm

CONFIG = radgrad.SketchConfig(method="quantize", bits=2)
# (kind, input shape): the HF ResNet's stem batch norm, a wider map, and a layer norm over two
# dimensions (a layer norm over one is not read by plane: NOTE [Reading codes by plane])
CASES = [("batch", (32, 32, 16, 16)), ("batch", (32, 64, 32, 32)), ("layer", (1024, 16, 16))]


def _forward(kind: str, rad: bool):
    def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if kind == "batch":
            return RF.batch_norm(x, None, None, w, b, True, config=CONFIG) if rad else \
                F.batch_norm(x, None, None, w, b, True)
        shape = x.shape[-2:]
        return RF.layer_norm(x, shape, w, b, config=CONFIG) if rad else F.layer_norm(x, shape, w, b)
    return torch.compile(forward, fullgraph=True)


def measure(kind: str, shape: tuple[int, ...], rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).requires_grad_()
    params = shape[1:2] if kind == "batch" else shape[-2:]
    w, b = (torch.randn(params, generator=g).requires_grad_() for _ in range(2))
    grad = torch.randn(shape, generator=g)
    torch._dynamo.reset()  # each way of each case is its own graph: stay below the recompile limit

    def run(rad: bool):
        forward = _forward(kind, rad)  # a compiled function of its own for each way
        return lambda: forward(x, w, b).backward(grad)

    by_plane = _norm._planes
    ways = {"plain": (run(False), by_plane), "by_plane": (run(True), by_plane),
            "input_shape": (run(True), lambda *args: None)}
    seconds = interleave.median_seconds(ways, _norm, "_planes", rounds)
    us = {name: s * 1e6 for name, s in seconds.items()}
    return {"kind": kind, "shape": list(shape), "microseconds": us}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    results = [measure(kind, shape, args.rounds) for kind, shape in CASES]
    print("| norm | input | plain torch us | radgrad by plane us | radgrad in the input's shape us |")
    print("|---|---|---|---|---|")
    for r in results:
        us = r["microseconds"]
        print(f"| {r['kind']} | {' x '.join(map(str, r['shape']))} | {us['plain']:.0f} | {us['by_plane']:.0f} "
              f"| {us['input_shape']:.0f} |")
    if args.out:
        report.write_json(args.out, vars(args), {"results": results})


if __name__ == "__main__":
    main()
