"""Compiled ReLU masks of feature maps: bit planes along the batch, or the opaque ops.

Between two convolutions inductor may lay a feature map out channels_last,
which it decides after tracing. radgrad packs the ReLU's mask of such a map in
bit planes split along the batch, elementwise in either layout (NOTE [Masks
under torch.compile] in radgrad.bits); batches whose planes would overlap too
much keep the opaque ops ``radgrad::pack_mask`` / ``radgrad::masked_grad``, which read
the map in logical order. For each shape this times the compiled forward and
backward pass of conv -> ReLU -> conv with plain torch's ReLU, radgrad's with
batch planes, and radgrad's with the opaque ops (selected by replacing
``radgrad.bits._batch_planes_fit``): medians over interleaved rounds, one
process.

    python benchmarks/bench_compiled_masks.py --threads 1 --out results/bench_compiled_masks_1thread.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import interleave
import radgrad.functional as RF
from radgrad import bits
from radgrad.experiments import report

# (batch, channels, height, width) of the ReLU's input: the paper's convnet's first and third
# ReLU at batch 150, and a map of the HF ResNet's second stage at batch 32
CASES = [(150, 16, 32, 32), (150, 32, 16, 16), (32, 128, 8, 8)]


def _forward(rad: bool):
    def forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, w1, padding=1)
        return F.conv2d(RF.relu(h) if rad else F.relu(h), w2, padding=1)
    return torch.compile(forward, fullgraph=True)


def measure(shape: tuple[int, ...], rounds: int) -> dict:
    n, c, height, width = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, height, width, generator=g).requires_grad_()
    w1, w2 = (torch.randn(c, c, 3, 3, generator=g).div_(3 * c ** 0.5).requires_grad_() for _ in range(2))
    grad = torch.randn(shape, generator=g)
    torch._dynamo.reset()  # each way of each case is its own graph: stay below the recompile limit

    def run(rad: bool):
        forward = _forward(rad)  # a compiled function of its own for each way
        return lambda: forward(x, w1, w2).backward(grad)

    fits = bits._batch_planes_fit
    ways = {"plain": (run(False), fits), "batch_planes": (run(True), fits), "opaque_ops": (run(True), lambda t: False)}
    seconds = interleave.median_seconds(ways, bits, "_batch_planes_fit", rounds)
    ms = {name: s * 1e3 for name, s in seconds.items()}
    return {"shape": list(shape), "milliseconds": ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    results = [measure(shape, args.rounds) for shape in CASES]
    print("| ReLU input | plain torch ms | batch planes ms (ratio) | opaque ops ms (ratio) |")
    print("|---|---|---|---|")
    for r in results:
        ms = r["milliseconds"]
        print(f"| {' x '.join(map(str, r['shape']))} | {ms['plain']:.2f} "
              f"| {ms['batch_planes']:.2f} ({ms['batch_planes'] / ms['plain']:.2f}) "
              f"| {ms['opaque_ops']:.2f} ({ms['opaque_ops'] / ms['plain']:.2f}) |")
    if args.out:
        report.write_json(args.out, vars(args), {"results": results})


if __name__ == "__main__":
    main()
