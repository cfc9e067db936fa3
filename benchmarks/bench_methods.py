"""Step time and memory of every way to train at about a tenth of the activation memory, against plain torch.

For the paper's MNIST MLP and CIFAR-10 convnet at batch 150: plain torch
(the reference), accumulation over micro-batches of the reduced batch's size,
checkpointing (the segmentation of lowest peak), the paper's RAD (keep 0.1,
different sample) and quantized RAD (2 bits), each with its own copy of the
same initial weights and its own Adam, on the same minibatches. Every round
runs one step of each, in an order rotated from round to round; the step-time
ratio of a method is the median over rounds of its step time over the
reference's in the same round. A step is forward, backward and optimizer step.
Saved bytes come from radgrad.memory, peaks (forward and backward, above the
weights) from radgrad.memory.peak, both on a batch of real data.

    python benchmarks/bench_methods.py --threads 1 --out results/bench_methods_1thread.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import radgrad
from radgrad.experiments import budget
from radgrad.experiments.steps import Stepper
from radgrad.experiments.tasks import get_task, load_data

BATCH = 150
KEEP = 0.1
TASKS = {"mlp": "mnist-mlp", "cnn": "cifar-cnn"}


def _methods(task_name: str) -> dict[str, tuple[nn.Module, Stepper]]:
    task = get_task(task_name)
    torch.manual_seed(0)
    plain = task.model()
    micro = budget.reduced_batch(plain, task, KEEP, BATCH)
    segments, _ = budget.checkpoint_segments(plain, task, KEEP, BATCH)
    return {
        "torch": (plain, Stepper()),
        f"accumulate (micro {micro})": (copy.deepcopy(plain), Stepper(micro=micro)),
        f"checkpoint ({segments} segments)": (copy.deepcopy(plain), Stepper(segments=segments)),
        "rad-paper": (budget.prepare(copy.deepcopy(plain), "different-sample", KEEP), Stepper()),
        "rad-quantize": (budget.prepare(copy.deepcopy(plain), "quantize", KEEP), Stepper()),
    }


def run_task(name: str, steps: int, warmup: int) -> dict:
    task = get_task(TASKS[name])
    data = load_data(task)
    methods = _methods(task.name)
    probe = data.train_x[:BATCH]
    rows = {}
    for label, (model, stepper) in methods.items():
        saved = None if stepper.segments else radgrad.memory.saved_bytes(model, probe[:stepper.micro or BATCH])
        rows[label] = {"saved_bytes": saved, "peak_bytes": budget.peak_bytes(model, task, BATCH, stepper)}
    optimizers = {label: torch.optim.Adam(m.parameters(), lr=1e-3) for label, (m, _) in methods.items()}
    labels = list(methods)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for i in tqdm(range(warmup + steps), desc=name):
        idx = torch.randint(len(data.train_y), (BATCH,))
        x, y = data.train_x[idx], data.train_y[idx]
        shift = i % len(labels)
        for label in labels[shift:] + labels[:shift]:
            model, stepper = methods[label]
            start = time.perf_counter()
            optimizers[label].zero_grad(set_to_none=True)
            stepper.backward(model, x, y)
            optimizers[label].step()
            if i >= warmup:
                times[label].append(time.perf_counter() - start)
    for label in labels:
        ratios = [t / r for t, r in zip(times[label], times["torch"])]
        rows[label] |= {"median_step_ratio": statistics.median(ratios),
                        "median_step_ms": 1e3 * statistics.median(times[label])}
    return {"task": task.name, "steps": steps, "batch": BATCH, "keep": KEEP, "methods": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mlp-steps", type=int, default=1000, help="rounds for the MNIST MLP")
    parser.add_argument("--cnn-steps", type=int, default=60, help="rounds for the CIFAR-10 convnet")
    parser.add_argument("--warmup", type=int, default=5, help="rounds left out of the figures")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [run_task(name, steps, args.warmup)
               for name, steps in (("mlp", args.mlp_steps), ("cnn", args.cnn_steps)) if steps > 0]
    print("| model | method | saved MB | peak MB (fwd+bwd, above weights) | step / torch (median) | ms/step |")
    print("|---" * 6 + "|")
    for r in results:
        for label, m in r["methods"].items():
            saved = "n/a" if m["saved_bytes"] is None else f"{m['saved_bytes'] / 1e6:.3f}"
            print(f"| {r['task']} | {label} | {saved} | {m['peak_bytes'] / 1e6:.3f} | {m['median_step_ratio']:.3f} "
                  f"| {m['median_step_ms']:.1f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"config": vars(args) | {"out": str(args.out)}, "radgrad": radgrad.__version__,
                "torch": torch.__version__, "threads": torch.get_num_threads(),
                "machine": f"{platform.machine()} {platform.processor()}".strip()}
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
