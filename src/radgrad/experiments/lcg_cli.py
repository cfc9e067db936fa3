"""LCG variance study: estimator variance against depth, independent vs fully interleaved paths.

    radgrad lcg-variance [--out docs/lcg] [--seed 0] [--width 8] [--max-depth 8] ...
    python -m radgrad.experiments.lcg_cli --out docs/lcg --seed 0

Reproduces the trend of the paper's Figure 2 on two LCGs of the same size
(see :mod:`radgrad.lcg.variance`): a chain of elementwise ops on a vector
(independent paths) and a stack of dense matmul + tanh layers (fully
interleaved). For each depth it measures the relative variance
``E||g_hat - g||^2 / ||g||^2`` of path sampling and of random matrix injection
and writes ``lcg_variance.png`` (log-scale), ``lcg_variance.csv`` and
``lcg_variance.md``, all naming the config and the seed.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
from pathlib import Path

from matplotlib.figure import Figure

from radgrad.experiments import options
from radgrad.lcg.variance import ESTIMATORS, GRAPHS, Row, VarianceConfig, study

STEM = "lcg_variance"
COLORS = dict(zip(ESTIMATORS, ["tab:blue", "tab:cyan", "tab:red", "tab:orange", "tab:green"]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the study's options to ``parser``."""
    d = VarianceConfig()
    parser.add_argument("--out", type=Path, default=Path("docs/lcg"), help="folder for PNG, CSV, markdown")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed for the graphs' constants and all sampling")
    parser.add_argument("--width", type=int, default=d.width, help="entries per layer")
    parser.add_argument("--max-depth", type=int, default=d.max_depth, help="depths 1..max-depth")
    parser.add_argument("--reps", type=int, default=d.reps, help="independent estimates per point (>= 2)")
    parser.add_argument("--keep", type=float, default=d.keep, help="keep fraction of the injections")
    parser.add_argument("--paths", type=int, default=d.paths, help="paths per path-sampling estimate")


def _checked_config(args: argparse.Namespace) -> VarianceConfig:
    """The study's config from the parsed ``args``, each value checked.

    Raises:
        ValueError: a value out of range (the message names the option and what it allows).
    """
    return VarianceConfig(
        width=options.check_int("width", args.width), max_depth=options.check_int("max-depth", args.max_depth),
        reps=options.check_int("reps", args.reps, 2), keep=options.check_keep(args.keep),
        paths=options.check_int("paths", args.paths), seed=options.check_seed(args.seed),
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run the study with the parsed ``args``; write the outputs; return an exit code (2: bad options)."""
    try:
        config = _checked_config(args)
        out = options.make_folder(args.out)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    rows = study(config, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    command = _command(config, out)
    _write_csv(rows, out / f"{STEM}.csv")
    (out / f"{STEM}.md").write_text(_markdown(rows, config, command))
    _plot(rows, config).savefig(out / f"{STEM}.png", dpi=130)
    print(f"wrote {out / STEM}.png, .csv, .md")
    return 0


def _command(config: VarianceConfig, out: Path) -> str:
    return (
        f"python -m radgrad.experiments.lcg_cli --out {out} --seed {config.seed} --width {config.width} "
        f"--max-depth {config.max_depth} --reps {config.reps} --keep {config.keep} --paths {config.paths}"
    )


def _write_csv(rows: list[Row], path: Path) -> None:
    fields = [f.name for f in dataclasses.fields(Row)]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow(dataclasses.asdict(row))


def _markdown(rows: list[Row], config: VarianceConfig, command: str) -> str:
    lines = [
        "# LCG estimator variance against depth",
        "",
        f"Config: `{config}`. Command: `{command}`.",
        "",
        "Relative variance E||g_hat - g||^2 / ||g||^2 of the gradient w.r.t. the input vector. "
        f"Each cell: exact value (computed, no sampling; `-` where no formula) / measured mean "
        f"+- standard error over {config.reps} estimates (path sampling: of one path, measured "
        f"as {config.paths} x the variance of {config.paths}-path means).",
        "",
        "Estimators: " + "; ".join(f"`{k}`: {v}" for k, v in ESTIMATORS.items()) + ".",
    ]
    for kind, desc in GRAPHS.items():
        mine = [r for r in rows if r.graph == kind]
        lines += ["", f"## {kind}: {desc}", "", "| depth | scalar paths | " + " | ".join(ESTIMATORS) + " |",
                  "|---|---|" + "---|" * len(ESTIMATORS)]
        for depth in sorted({r.depth for r in mine}):
            at_depth = {r.estimator: r for r in mine if r.depth == depth}
            cells = [
                ("-" if r.exact is None else f"{r.exact:.3g}") + f" / {r.measured:.3g} +- {r.se:.2g}"
                for r in (at_depth[name] for name in ESTIMATORS)
            ]
            paths = at_depth[next(iter(ESTIMATORS))].scalar_paths
            lines.append(f"| {depth} | {paths} | " + " | ".join(cells) + " |")
        deepest = max(r.depth for r in mine)
        stored = [r for r in mine if r.depth == deepest and r.exact_stored]
        lines += ["", f"Stored values at depth {deepest} (with injection / exact reverse mode): "
                  + ", ".join(f"`{r.estimator}` {r.stored}/{r.exact_stored}" for r in stored) + "."]
    return "\n".join(lines) + "\n"


def _plot(rows: list[Row], config: VarianceConfig) -> Figure:
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (kind, desc) in zip(axes, GRAPHS.items()):
        for name in ESTIMATORS:
            mine = sorted((r for r in rows if r.graph == kind and r.estimator == name), key=lambda r: r.depth)
            depths = [r.depth for r in mine]
            if all(r.exact is not None for r in mine):
                ax.plot(depths, [r.exact for r in mine], lw=1.5, color=COLORS[name])
            # +-2 SE, the lower bar clipped above zero for the log scale
            low = [min(2 * r.se, 0.9 * r.measured) for r in mine]
            ax.errorbar(depths, [r.measured for r in mine], yerr=[low, [2 * r.se for r in mine]], ls="none",
                        marker="o", ms=4, capsize=2, color=COLORS[name], label=name)
        ax.set_yscale("log")
        ax.set_xlabel("depth (layers)")
        ax.set_title(f"{kind}\n{desc}", fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("relative variance  E||ĝ-g||² / ||g||²")
    axes[1].legend(fontsize=8, title="markers: measured ±2 SE; lines: exact", title_fontsize=8,
                   loc="upper left")
    fig.suptitle(
        f"LCG estimator variance vs depth: width {config.width}, keep {config.keep}, "
        f"{config.reps} estimates per point, seed {config.seed}",
        fontsize=10,
    )
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
