"""Reactor benchmark: time per loss+gradient and memory saved for backward, at the paper's size.

    python benchmarks/bench_reactor.py [--t-end 10] [--repeats 5] [--plain-repeats 2] [--threads 1]

Times one ``loss(theta)`` + ``backward`` (median over repeats, all methods interleaved in
the same process) for: the plain autograd loop (``reactor.loss_reference``, one torch op per
stencil term, every intermediate kept), radgrad's adjoint at keep=1 and keep=0.01, and
exact checkpointing. Memory is what :mod:`radgrad.memory` sees saved for backward, for
the keep fractions of the paper and for checkpointing. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import radgrad
from radgrad.experiments import reactor

KEEPS = (1.0, 0.1, 0.01, 0.005, 0.002, 0.001)


def _timed(fn: Callable[..., torch.Tensor], theta: torch.Tensor, **kw) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    (grad,) = torch.autograd.grad(fn(theta, **kw), theta)
    return time.perf_counter() - start, grad


def _saved(fn: Callable[..., torch.Tensor], theta: torch.Tensor, **kw) -> int:
    with radgrad.memory.record() as rec:
        fn(theta, **kw)
    return rec.total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--t-end", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of radgrad's methods")
    parser.add_argument("--plain-repeats", type=int, default=2, help="timed repeats of the plain loop")
    parser.add_argument("--checkpoint-every", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    opts = dict(t_end=args.t_end)  # nx=32, dt=1/4096, diffusion=0.25: the paper's resolution
    theta = reactor.initial_theta(torch.Generator().manual_seed(0)).requires_grad_()
    methods: dict[str, tuple[Callable[..., torch.Tensor], dict]] = {
        "plain autograd loop": (reactor.loss_reference, opts),
        "radgrad adjoint, keep=1 (exact)": (reactor.loss, opts),
        "radgrad adjoint, keep=0.01 (RAD)": (reactor.loss, dict(opts, keep=0.01)),
    }
    for m in args.checkpoint_every:
        methods[f"checkpointing every {m} (exact)"] = (reactor.loss, dict(opts, checkpoint_every=m))
    times: dict[str, list[float]] = {name: [] for name in methods}
    grads: dict[str, torch.Tensor] = {}
    for r in range(max(args.repeats, args.plain_repeats)):
        for name, (fn, kw) in methods.items():
            if r < (args.plain_repeats if fn is reactor.loss_reference else args.repeats):
                seconds, grads[name] = _timed(fn, theta, **kw)
                times[name].append(seconds)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    plain = median["plain autograd loop"]
    exact_grad = grads["radgrad adjoint, keep=1 (exact)"]
    steps = round(args.t_end * 4096)
    print(f"## Reactor, nx=32 (31x31 unknowns), dt=1/4096, T={args.t_end:g} ({steps} steps), "
          f"float64, torch {torch.__version__}, {args.threads} thread(s)\n")
    print("| method | time per loss+grad (median) | repeats | speed-up vs plain loop | max abs grad diff vs keep=1 |")
    print("|---|---|---|---|---|")
    for name in methods:
        diff = (grads[name] - exact_grad).abs().max().item()
        print(f"| {name} | {median[name]:.3f} s | {len(times[name])} | {plain / median[name]:.1f}x "
              f"| {diff:.1e} |")
    rows = [(f"keep={k:g}", reactor.loss, dict(opts, keep=k)) for k in KEEPS]
    rows += [(f"checkpointing every {m}", reactor.loss, dict(opts, checkpoint_every=m)) for m in args.checkpoint_every]
    rows += [("plain autograd loop", reactor.loss_reference, opts)]
    saved = {name: _saved(fn, theta, **kw) for name, fn, kw in rows}
    exact = saved["keep=1"]
    print("\n| stored for backward | bytes (radgrad.memory) | MB | % of keep=1 |")
    print("|---|---|---|---|")
    for name, nbytes in saved.items():
        print(f"| {name} | {nbytes} | {nbytes / 1e6:.2f} | {100 * nbytes / exact:.3g}% |")


if __name__ == "__main__":
    main()
