"""The reactor control experiment (paper section 5, Figure 6): optimise theta with RAD.

    radgrad reactor --keep 0.01 --iters 800 --optimizer adam --lr 1e-2 --seed 0 --out runs/reactor
    radgrad reactor --sweep --out docs/reactor        # keep 1, 0.1, 0.01, 0.005, 0.002, 0.001
    python -m radgrad.experiments.reactor_cli ...     # the same, without the main CLI

Every keep fraction starts from the same ``initial_theta`` (drawn from ``--seed``) and its
sampling is seeded with ``--seed`` too. The loss recorded at each iteration is the exact
loss of the current theta (the forward pass is never randomized); only the gradient is an
estimate for ``keep < 1``. Writes ``reactor.json`` (config, seed, radgrad version, losses,
thetas, saved bytes measured by :mod:`radgrad.memory`, seconds per iteration),
``reactor_loss.png`` (loss against iteration per keep fraction) and ``reactor_flux.png``
(the controlled flux against the target along ``y = 1/2`` at a few times).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from tqdm import tqdm

import radgrad
from radgrad.experiments import reactor
from radgrad.experiments import options

SWEEP = (1.0, 0.1, 0.01, 0.005, 0.002, 0.001)
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
STEM = "reactor"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the experiment's options to ``parser``."""
    parser.add_argument("--keep", type=float, nargs="+", default=[1.0], help="keep fraction(s) of each stored state")
    parser.add_argument("--sweep", action="store_true", help=f"run the paper's keep fractions {SWEEP}")
    parser.add_argument("--iters", type=int, default=800, help="optimisation steps per keep fraction")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam")
    parser.add_argument("--lr", type=float, default=1e-2, help="learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial theta and of all sampling")
    parser.add_argument("--out", type=Path, default=Path("runs/reactor"), help="folder for JSON and PNGs")
    parser.add_argument("--t-end", type=float, default=10.0, help="horizon T")
    parser.add_argument("--nx", type=int, default=32, help="cells per side (grid of nx+1 nodes)")
    parser.add_argument("--dt", type=float, default=1 / 4096, help="time step")
    parser.add_argument("--method", choices=sorted(radgrad.METHODS), default="sample", help="RAD estimator")
    parser.add_argument("--bits", type=int, choices=radgrad.BITS, default=None,
                        help="store the kept values in this many bits (method quantize: every value, --keep 1)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="exact checkpointing instead of RAD")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (small ops: 1 is fastest)")
    parser.add_argument("--jobs", type=int, default=1, help="keep fractions optimised in parallel processes")


def run(args: argparse.Namespace) -> int:
    """Run the experiment with the parsed ``args``; write JSON and PNGs; return an exit code."""
    keeps = list(SWEEP) if args.sweep else list(args.keep)
    problem = dict(nx=args.nx, dt=args.dt, t_end=args.t_end)
    try:
        for keep in keeps:
            options.check_keep(keep)
            reactor.validate(**problem, keep=keep, method=args.method, checkpoint_every=args.checkpoint_every,
                             bits=args.bits)
        options.check_int("iters", args.iters)
        options.check_number("lr", args.lr)
        options.check_seed(args.seed)
        options.check_int("threads", args.threads, 1, options.WORKERS_MAX)
        options.check_int("jobs", args.jobs, 1, options.WORKERS_MAX)
        out = options.make_folder(args.out)
    except (TypeError, ValueError) as err:
        print(err, file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    tasks = [(args, keep, problem, i) for i, keep in enumerate(keeps)]
    if args.jobs == 1:
        runs = [_optimise(*task) for task in tasks]
    else:
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=spawn) as pool:
            runs = list(pool.map(_optimise, *zip(*tasks)))
    result = {"radgrad_version": radgrad.__version__, "seed": args.seed, "command": _command(args),
              "config": _config(args, keeps), "runs": runs}
    (out / f"{STEM}.json").write_text(json.dumps(result, indent=1))
    _plot_loss(runs, args).savefig(out / f"{STEM}_loss.png", dpi=130)
    _plot_flux(runs, args).savefig(out / f"{STEM}_flux.png", dpi=130)
    print(f"wrote {out / STEM}.json, {STEM}_loss.png, {STEM}_flux.png")
    return 0


def _optimise(args: argparse.Namespace, keep: float, problem: dict[str, Any], bar: int = 0) -> dict[str, Any]:
    """``args.iters`` optimiser steps from the seeded start; the record of one run."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = reactor.initial_theta(torch.Generator().manual_seed(args.seed))
    theta = start.clone().requires_grad_()
    opt = OPTIMIZERS[args.optimizer]([theta], lr=args.lr)
    kwargs = dict(problem, keep=keep, method=args.method, checkpoint_every=args.checkpoint_every, bits=args.bits)
    with radgrad.memory.record() as rec:
        reactor.loss(theta, **kwargs)
    losses = []
    t0 = time.perf_counter()
    for _ in tqdm(range(args.iters), desc=f"reactor keep={keep:g}", file=sys.stderr, position=bar):
        opt.zero_grad()
        value = reactor.loss(theta, **kwargs)
        value.backward()
        opt.step()
        losses.append(value.item())
    seconds = (time.perf_counter() - t0) / args.iters
    with torch.no_grad():
        losses.append(reactor.loss(theta, **problem).item())
    return {"keep": keep, "saved_bytes": rec.total, "seconds_per_iter": seconds, "losses": losses,
            "initial_theta": start.tolist(), "final_theta": theta.detach().tolist()}


def _config(args: argparse.Namespace, keeps: Sequence[float]) -> dict[str, Any]:
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    config["keep"] = list(keeps)
    config["diffusion"] = 0.25
    config["steps"] = round(args.t_end / args.dt)
    return config


def _command(args: argparse.Namespace) -> str:
    keep = "--sweep" if args.sweep else "--keep " + " ".join(f"{k:g}" for k in args.keep)
    extra = f" --checkpoint-every {args.checkpoint_every}" if args.checkpoint_every else ""
    extra += f" --bits {args.bits}" if args.bits else ""
    return (
        f"python -m radgrad.experiments.reactor_cli {keep} --iters {args.iters} --optimizer {args.optimizer} "
        f"--lr {args.lr:g} --seed {args.seed} --out {args.out} --t-end {args.t_end:g} --nx {args.nx} "
        f"--dt {args.dt!r} --method {args.method} --threads {args.threads} --jobs {args.jobs}{extra}"
    )


def _label(run: dict[str, Any], exact_bytes: int | None) -> str:
    label = f"keep={run['keep']:g}"
    if exact_bytes:
        label += f" ({100 * run['saved_bytes'] / exact_bytes:.3g}% memory)"
    return label


def _plot_loss(runs: list[dict[str, Any]], args: argparse.Namespace) -> Figure:
    """Loss against iteration, one line per keep fraction (the paper's Figure 6)."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    exact = next((r["saved_bytes"] for r in runs if r["keep"] == 1.0), None)
    for run in runs:
        ax.plot(range(len(run["losses"])), run["losses"], label=_label(run, exact), lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (exact, at the current theta)")
    ax.set_title(f"Reactor control, {args.optimizer} lr={args.lr:g}, T={args.t_end:g}, seed={args.seed}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _flux_times(t_end: float) -> list[float]:
    """Four times in the last period (2) of the target, or spread over a shorter horizon."""
    if t_end >= 2:
        return [t_end - 1.5, t_end - 1.0, t_end - 0.5, t_end]
    return [t_end * f for f in (0.25, 0.5, 0.75, 1.0)]


def _plot_flux(runs: list[dict[str, Any]], args: argparse.Namespace) -> Figure:
    """``phi(x, 1/2, t)`` of the initial and optimised thetas against the target."""
    times = _flux_times(args.t_end)
    problem = dict(nx=args.nx, dt=args.dt, t_end=args.t_end)
    x = torch.linspace(0, 1, args.nx + 1)
    mid = args.nx // 2
    fig = Figure(figsize=(11, 3.4))
    axes = fig.subplots(1, len(times), sharey=True)
    curves = [("initial theta", runs[0]["initial_theta"], dict(color="0.6", ls=":"))]
    curves += [(f"keep={r['keep']:g}", r["final_theta"], {}) for r in runs]
    flux = {name: reactor.simulate(torch.tensor(th, dtype=torch.float64), times, **problem)
            for name, th, _ in curves}
    goal = reactor.target(times, nx=args.nx)
    for i, (ax, t) in enumerate(zip(axes, times)):
        ax.plot(x, goal[i, :, mid], color="k", lw=2.5, alpha=0.35, label="target")
        for name, _, style in curves:
            ax.plot(x, flux[name][i, :, mid], lw=1, label=name, **style)
        ax.set_title(f"t = {t:g}")
        ax.set_xlabel("x (y = 1/2)")
    axes[0].set_ylabel("phi")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m radgrad.experiments.reactor_cli``."""
    parser = argparse.ArgumentParser(prog="radgrad reactor", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
