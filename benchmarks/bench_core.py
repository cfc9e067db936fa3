"""Saved-memory and step-time ratios, RAD / exact, for the paper's MLP and convnet at batch 150.

Both models start from the same weights and train side by side in one process
on the same minibatches (drawn with replacement), with Adam. Steps are
interleaved in ABBA order so that slow drifts of the machine hit both alike;
a step is forward, backward and optimizer step. The step-time ratio is the
median of the per-pair ratios, also reported over the first and last tenth of
the run, so a slowdown that appears only late in training shows. With
``--compile`` both models run under ``torch.compile`` (inductor); the first
``--warmup`` steps, which include compilation, are left out of every figure.

    python benchmarks/bench_core.py --mlp-steps 3000 --cnn-steps 300 --out results/bench_core.json
    python benchmarks/bench_core.py --compile --out results/bench_core_compiled.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import radgrad
from radgrad.experiments import data as datasets
from radgrad.experiments import report

BATCH = 150
KEEP = 0.1


def _tensors(task: str, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    if source == "random":
        shape = (6000, 1, 28, 28) if task == "mlp" else (6000, 3, 32, 32)
        return torch.rand(shape), torch.randint(10, (shape[0],))
    data = datasets.to_tensors(datasets.load_mnist() if task == "mlp" else datasets.load_cifar10())
    return data.train_x, data.train_y


def _step(model, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start, loss.item()


def _window(ratios: list[float], part: slice) -> float:
    return statistics.median(ratios[part])


def run_task(task: str, steps: int, source: str, seed: int, compile: bool = False, warmup: int = 10) -> dict:
    torch.manual_seed(seed)
    exact = radgrad.models.mnist_mlp() if task == "mlp" else radgrad.models.cifar_convnet()
    rad = radgrad.convert(copy.deepcopy(exact), keep=KEEP, method="sample", per_example=True)
    images, labels = _tensors(task, source)
    probe = images[:BATCH]
    memory = {"exact_bytes": radgrad.memory.saved_bytes(exact, probe),
              "rad_bytes": radgrad.memory.saved_bytes(rad, probe)}
    models = {"exact": exact, "rad": rad}
    optimizers = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in models.items()}
    if compile:
        models = {k: torch.compile(m) for k, m in models.items()}
    times: dict[str, list[float]] = {"exact": [], "rad": []}
    losses: dict[str, list[float]] = {"exact": [], "rad": []}
    for i in tqdm(range(warmup + steps), desc=f"{task} ({source}{', compiled' if compile else ''})"):
        idx = torch.randint(len(labels), (BATCH,))
        x, y = images[idx], labels[idx]
        order = ("exact", "rad") if i % 2 == 0 else ("rad", "exact")
        for name in order:
            seconds, loss = _step(models[name], optimizers[name], x, y)
            if i >= warmup:
                times[name].append(seconds)
                losses[name].append(loss)
    ratios = [r / e for r, e in zip(times["rad"], times["exact"])]
    tenth = max(1, steps // 10)
    return {
        "task": task, "data": source, "steps": steps, "batch": BATCH, "keep": KEEP, "compiled": compile,
        **memory, "memory_ratio": memory["rad_bytes"] / memory["exact_bytes"],
        "median_step_ratio": statistics.median(ratios),
        "median_step_ratio_first_tenth": _window(ratios, slice(0, tenth)),
        "median_step_ratio_last_tenth": _window(ratios, slice(-tenth, None)),
        "median_step_ms_exact": 1e3 * statistics.median(times["exact"]),
        "median_step_ms_rad": 1e3 * statistics.median(times["rad"]),
        "final_loss_exact": statistics.mean(losses["exact"][-tenth:]),
        "final_loss_rad": statistics.mean(losses["rad"][-tenth:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mlp-steps", type=int, default=3000, help="training steps for the MNIST MLP")
    parser.add_argument("--cnn-steps", type=int, default=300, help="training steps for the CIFAR-10 convnet")
    parser.add_argument("--data", choices=["real", "random"], default="real", help="real datasets or random tensors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="run both models under torch.compile")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the figures (compilation)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [run_task(task, steps, args.data, args.seed, args.compile, args.warmup)
               for task, steps in (("mlp", args.mlp_steps), ("cnn", args.cnn_steps)) if steps > 0]
    print("| model | steps | saved bytes exact | saved bytes RAD | memory ratio | step ratio (median) "
          "| first tenth | last tenth | ms/step exact | ms/step RAD | final loss exact | final loss RAD |")
    print("|---" * 12 + "|")
    for r in results:
        print(f"| {r['task']} | {r['steps']} | {r['exact_bytes']:,} | {r['rad_bytes']:,} | {r['memory_ratio']:.3f} "
              f"| {r['median_step_ratio']:.3f} | {r['median_step_ratio_first_tenth']:.3f} "
              f"| {r['median_step_ratio_last_tenth']:.3f} | {r['median_step_ms_exact']:.1f} "
              f"| {r['median_step_ms_rad']:.1f} | {r['final_loss_exact']:.3f} | {r['final_loss_rad']:.3f} |")
    if args.out:
        report.write_json(args.out, vars(args), {"results": results})


if __name__ == "__main__":
    main()
