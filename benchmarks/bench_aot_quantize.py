"""radgrad's compiled quantization built ahead of time by AOTInductor, called from eager code.

The eager quantization is about forty torch operations per tensor, each a
pass over the entries or a call's fixed cost; under ``torch.compile``
inductor fuses the same code (the compiled path of
``radgrad.estimators.quantize``) into a few loops. This measures what
eager layers would gain by calling that compiled code, built ahead of
time into a package by ``torch._inductor.aoti_compile_and_package``:
the range, the scale and the packed ``--bits``-bit codes of a
``(rows, n)`` float32 tensor, with the number of rows dynamic and the width
fixed (the packing's planes depend on it). Per size: the package's build
time (C++ compiler included), then medians of ``--calls`` calls, one
thread, interleaved: the eager ``quantize`` (its draw included), the
package with a draw made apart, and the package on 8 rows (its per-call
cost). It also checks that the package stores the eager bytes for the
same draw.

    python benchmarks/bench_aot_quantize.py --out results/bench_aot_quantize.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from radgrad import rng
from radgrad.estimators import quantize
from radgrad.experiments import report

#: (rows, n): a ViT's hidden states (batch 32, 65 tokens, 256 wide), a ResNet stage's 8x8 maps
#: (batch 32, 64 channels), the MNIST MLP's input (batch 150)
_SIZES = ((2080, 256), (2048, 64), (150, 784))


class _Quantize(nn.Module):
    """The compiled path of :func:`radgrad.estimators.quantize.quantize` without its draw: ``(codes, scale)``."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, values: Tensor, grid: Tensor) -> tuple[Tensor, Tensor]:
        group = quantize.group_rows(values.shape[1])
        lo, step, inverse = quantize._group_scales(values, group, self.bits)
        codes = quantize._plane_codes.__wrapped__(values, group, lo, inverse, grid, self.bits)
        return codes, torch.stack([lo, step], dim=1)


def _grid(x: Tensor) -> Tensor:
    rows, n = x.shape
    group = quantize.group_rows(n)
    return rng.draw_grid(-(-rows // group), group * n, x)[0]


def measure(rows: int, n: int, bits: int, calls: int) -> dict:
    x = torch.randn(rows, n)
    group = quantize.group_rows(n)
    groups = torch.export.Dim("groups", min=2, max=2**20)
    exported = torch.export.export(_Quantize(bits), (x, _grid(x)),
                                   dynamic_shapes=({0: group * groups}, {0: groups + group * n}))
    start = time.perf_counter()
    path = torch._inductor.aoti_compile_and_package(exported, package_path=str(Path(tempfile.mkdtemp()) / "q.pt2"))
    build = time.perf_counter() - start
    package = torch._inductor.aoti_load_package(path)
    torch.manual_seed(0)
    eager_codes, eager_scale = quantize.quantize(x, bits, x, None)
    torch.manual_seed(0)
    codes, scale = package(x, _grid(x))
    same = torch.equal(codes, eager_codes) and torch.equal(scale, eager_scale)
    small = torch.randn(8, n)
    small_grid = _grid(small)
    runs = {"eager": lambda: quantize.quantize(x, bits, x, None), "package": lambda: package(x, _grid(x)),
            "package_8_rows": lambda: package(small, small_grid)}
    seconds = {name: [] for name in runs}
    for _ in range(calls):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    us = {name: statistics.median(s) * 1e6 for name, s in seconds.items()}
    return {"rows": rows, "n": n, "bits": bits, "build_seconds": build, "median_us": us, "same_bytes": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=2, choices=quantize.BITS)
    parser.add_argument("--calls", type=int, default=300, help="timed calls of each, interleaved")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if args.calls < 1:
        parser.error(f"--calls must be >= 1, got {args.calls}")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    results = [measure(rows, n, args.bits, args.calls) for rows, n in _SIZES]
    print(report.markdown(
        ("rows x n", "build (s)", "eager (us)", "package (us)", "eager / package", "package, 8 rows (us)", "same bytes"),
        [(f"{r['rows']} x {r['n']}", f"{r['build_seconds']:.0f}", f"{r['median_us']['eager']:.0f}",
          f"{r['median_us']['package']:.0f}", f"{r['median_us']['eager'] / r['median_us']['package']:.2f}",
          f"{r['median_us']['package_8_rows']:.0f}", r["same_bytes"]) for r in results]))
    if args.out:
        report.write_json(args.out, vars(args), {"results": results})


if __name__ == "__main__":
    main()
