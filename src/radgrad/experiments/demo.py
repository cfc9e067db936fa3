"""The demo: the MNIST MLP trained exactly, with a reduced batch, and with RAD, at a glance.

    python -m radgrad.experiments.demo [--steps 12000] [--seed 0] [--out runs/demo] [--threads N]

Three methods, each with the paper's learning rate and weight decay:
``baseline`` (batch 150, exact), ``reduced-batch`` (the largest batch whose
saved memory, measured by the ruler, does not exceed RAD's; see
:func:`radgrad.experiments.budget.reduced_batch`) and ``rad``
(batch 150, keep 0.1, a different sample per example). Prints the measured
memory, the final training loss and the test accuracy of each, and writes a
JSON file and a learning-curve PNG that name the config.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn
from tqdm import tqdm

import radgrad
from radgrad.experiments import budget
from radgrad.experiments import data as datasets
from radgrad.experiments.tasks import get_task

BATCH = 150
KEEP = 0.1
TASK = get_task("mnist-mlp")
# (learning rate, weight decay) of each demo run: the paper's, from the task registry
HYPER = {name: TASK.lr_wd(method) for name, method in
         (("baseline", "baseline"), ("reduced-batch", "reduced-batch"), ("rad", "different-sample"))}


def train(model: nn.Module, name: str, batch: int, steps: int, images, labels) -> list[float]:
    lr, wd = HYPER[name]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, steps // 10), gamma=0.6)
    losses = []
    for _ in tqdm(range(steps), desc=name, leave=False):
        idx = torch.randint(len(labels), (batch,))
        loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return (model(images).argmax(1) == labels).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12000,
                        help="training iterations per method (12000: about 4 minutes on this 2-core machine)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, minibatches and RAD samples")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for the JSON and the PNG")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice; 1 is faster on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    data = datasets.to_tensors(datasets.load_mnist())
    torch.manual_seed(args.seed)
    init = radgrad.models.mnist_mlp()
    rad = radgrad.convert(copy.deepcopy(init), keep=KEEP, method="sample", per_example=True)
    small = budget.reduced_batch(init, TASK, KEEP, BATCH)
    runs = {"baseline": (copy.deepcopy(init), BATCH), "reduced-batch": (copy.deepcopy(init), small),
            "rad": (rad, BATCH)}
    results = {}
    for name, (model, batch) in runs.items():
        torch.manual_seed(args.seed + 1)
        memory = radgrad.memory.saved_bytes(model, data.train_x[:batch])
        losses = train(model, name, batch, args.steps, data.train_x, data.train_y)
        tail = losses[-max(1, args.steps // 20):]
        results[name] = {"batch": batch, "saved_bytes": memory, "final_train_loss": sum(tail) / len(tail),
                         "test_accuracy": accuracy(model, data.test_x, data.test_y), "losses": losses}

    print(f"MNIST MLP, {args.steps} iterations, seed {args.seed}")
    print("| method | batch | saved for backward | final train loss | test accuracy |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['batch']} | {r['saved_bytes'] / 1e6:.3f} MB | {r['final_train_loss']:.4f} "
              f"| {100 * r['test_accuracy']:.2f}% |")
    args.out.mkdir(parents=True, exist_ok=True)
    config = {"task": "mnist-mlp", "steps": args.steps, "seed": args.seed, "keep": KEEP, "hyper": HYPER,
              "threads": torch.get_num_threads(),
              "radgrad": radgrad.__version__}
    (args.out / "demo.json").write_text(json.dumps({"config": config, "results": results}, indent=1))
    _plot(results, config, args.out / "demo.png")
    print(f"wrote {args.out / 'demo.json'} and {args.out / 'demo.png'}")
    return 0


def _plot(results: dict, config: dict, path: Path) -> None:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for name, r in results.items():
        losses = torch.tensor(r["losses"])
        window = max(1, len(losses) // 50)
        smooth = losses.unfold(0, window, 1).mean(1) if len(losses) >= window else losses
        ax.plot(range(window, window + len(smooth)), smooth, label=f"{name} (batch {r['batch']}, "
                f"{r['saved_bytes'] / 1e6:.2f} MB)")
    ax.set(xlabel="iteration", ylabel="training loss (moving average)", yscale="log",
           title=f"MNIST MLP, keep {config['keep']}, seed {config['seed']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
