"""Compiling a converted model with many distinct shapes: what looking up the nested compile regions costs.

radgrad's compiled quantization and rebuild are nested compile regions
(NOTE [Traced once per shape] in radgrad.estimators.quantize). Dynamo keeps
one traced graph per distinct input and, at every call, looks for a match
among those it has. This times the first training step of a stack of
``--layers`` linear layers, every one of another input width (so every
quantization and rebuild is of a shape not seen before), converted with
``method="quantize"`` and compiled with ``backend="aot_eager"`` (dynamo and
AOTAutograd only: no C++ compilation), and reports dynamo's own timers:
the lookups (``invoke_subgraph_reuse_lookup``) against the whole
compilation. With ``--inline`` the regions are traced inline at every call
instead, as before they were regions. Run each setting in its own process:

    python benchmarks/bench_region_reuse.py --layers 200 --out results/bench_region_reuse_200.json
    python benchmarks/bench_region_reuse.py --layers 200 --inline --out results/bench_region_reuse_200_inline.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn
from torch._dynamo.utils import compile_times

import radgrad
from radgrad.estimators import quantize
from radgrad.experiments import report

#: dynamo's timers reported, as named by ``torch._dynamo.utils.compile_times``
_TIMERS = ("_compile.compile_inner", "bytecode_tracing", "invoke_subgraph_trace", "invoke_subgraph_reuse_lookup",
           "create_aot_dispatcher_function")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=200, help="linear layers, each of a distinct input width")
    parser.add_argument("--inline", action="store_true", help="trace the quantization inline at every call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if args.layers < 1:
        parser.error(f"--layers must be >= 1, got {args.layers}")
    if args.inline:
        for name in ("_plane_codes", "_scaled_planes"):
            setattr(quantize, name, getattr(quantize, name).__wrapped__)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    widths = [16 + i for i in range(args.layers + 1)]
    model = radgrad.convert(nn.Sequential(*(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))),
                            method="quantize")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    start = time.perf_counter()
    compiled(torch.randn(8, widths[0])).sum().backward()
    first = time.perf_counter() - start
    timers = dict(line.split(", ") for line in compile_times(repr="str", aggregate=True).splitlines()[2:])
    seconds = {name: float(timers[name]) for name in _TIMERS if name in timers}
    print(report.markdown(("layers", "tracing", "first step (s)", *_TIMERS),
                          [(args.layers, "inline" if args.inline else "regions", f"{first:.1f}",
                            *(f"{seconds[n]:.3f}" if n in seconds else "n/a" for n in _TIMERS))]))
    if args.out:
        report.write_json(args.out, vars(args), {"first_step_seconds": first, "dynamo_seconds": seconds})


if __name__ == "__main__":
    main()
