"""radgrad.convert(model, method="quantize") on the models people train, against the same model in plain torch.

The models of radgrad.experiments.real_models (Hugging Face GPT-2 with its
Conv1D layers, BERT, ViT, ResNet; an nn.TransformerEncoder language model),
built from their configs with random weights, one training batch each of
their data (standard-library text, CIFAR-10), and an MLP with GELU,
LayerNorm and dropout on random data. For each: the bytes
saved for backward (radgrad.memory.measure) and the peak of a forward and
backward pass above the weights (radgrad.memory.peak), converted over plain;
the time of that pass, converted over plain (median of interleaved rounds,
one process); and the modules holding most of the remaining saved bytes.

    python benchmarks/bench_real_models.py --threads 1 --out results/bench_real_models_1thread.json
    python benchmarks/bench_real_models.py --threads 1 --compiled --out results/bench_real_models_compiled.json
    python benchmarks/bench_real_models.py --rounds 0 --out results/bench_real_models_memory.json  # memory only
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
import transformers
from torch import nn

import radgrad
from radgrad.experiments import real_models, report


def _mlp_loss():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1000, 512, generator=g), torch.randint(10, (1000,), generator=g)
    return lambda m: nn.functional.cross_entropy(m(x), y)


def mlp() -> nn.Module:
    """Four 512-wide blocks of Linear, LayerNorm, GELU and Dropout (random data, batch 1000)."""
    return nn.Sequential(*(m for _ in range(4) for m in (nn.Linear(512, 512), nn.LayerNorm(512), nn.GELU(),
                                                          nn.Dropout(0.1))), nn.Linear(512, 10))


MODELS = [*real_models.MODELS, "mlp-gelu-layernorm-dropout"]


def _model_and_loss(name: str, method: str):
    """The model (seed 0) and a closure computing its loss on one fixed training batch."""
    if name == "mlp-gelu-layernorm-dropout":
        torch.manual_seed(0)
        model = mlp().train()
        if method == "quantize":
            radgrad.convert(model, method="quantize")
        return model, _mlp_loss()
    model, spec = real_models.build(name, method, 0)
    batch = spec.batch(real_models.load_data(spec.data), torch.Generator().manual_seed(0))
    return model, lambda m: spec.loss(m, batch)


def saved(model, loss) -> radgrad.memory.MemoryRecord:
    with radgrad.memory.record(model) as rec:
        loss(model)
    return rec


def peak(model, loss) -> int:
    return radgrad.memory.peak(lambda: loss(model).backward(), model).added


def _step_seconds(model, loss) -> float:
    start = time.perf_counter()
    loss(model).backward()
    return time.perf_counter() - start


def step_times(models: dict[str, nn.Module], loss, rounds: int) -> dict[str, list[float]]:
    """Seconds of each model's training step (forward and backward) over ``rounds`` rounds after one
    warm-up step each, the order reversed every other round."""
    for m in models.values():
        _step_seconds(m, loss)
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(rounds):
        order = list(models.items()) if i % 2 == 0 else list(models.items())[::-1]
        for k, m in order:
            times[k].append(_step_seconds(m, loss))
    return times


def measure(name: str, rounds: int, compiled: bool) -> dict:
    plain, loss = _model_and_loss(name, "exact")
    rad, _ = _model_and_loss(name, "quantize")
    models = {"plain": plain, "radgrad": rad}
    records = {k: saved(m, loss) for k, m in models.items()}
    peaks = {k: peak(m, loss) for k, m in models.items()}
    if not rounds:  # memory only
        return memory_result(name, rad, records, peaks)
    times = step_times(models, loss, rounds)
    result = {}
    if compiled:
        compiled_models = {"plain": torch.compile(plain), "radgrad": torch.compile(rad)}
        for m in compiled_models.values():  # compile; step_times warms up once more
            _step_seconds(m, loss)
        ctimes = step_times(compiled_models, loss, rounds)
        result["compiled_step_ratio"] = statistics.median(ctimes["radgrad"]) / statistics.median(ctimes["plain"])
    return {**memory_result(name, rad, records, peaks),
            "step_seconds": {k: statistics.median(v) for k, v in times.items()},
            "step_ratio": statistics.median(times["radgrad"]) / statistics.median(times["plain"]),
            **result}


def memory_result(name: str, rad: nn.Module, records: dict, peaks: dict) -> dict:
    """Saved and peak bytes, plain and converted, their ratios, and the module types holding the most."""
    holders = Counter()
    for module, nbytes in records["radgrad"].by_module.items():
        holders[type(rad.get_submodule(module)).__name__ if module not in ("", radgrad.memory.OUTSIDE)
                else module or "(model)"] += nbytes
    total = records["radgrad"].total
    return {
        "model": name,
        "saved_bytes": {k: r.total for k, r in records.items()},
        "saved_ratio": total / records["plain"].total,
        "peak_bytes": peaks,
        "peak_ratio": peaks["radgrad"] / peaks["plain"],
        "remaining_holders": {k: v / total for k, v in holders.most_common(4)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--compiled", action="store_true", help="also time torch.compile'd models")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (0: memory only)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    print("| model | saved ratio | peak ratio | step ratio (eager) | step ratio (compiled) "
          "| what holds the remaining saved bytes |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        r = measure(name, args.rounds, args.compiled)
        holders = ", ".join(f"{k} {v:.0%}" for k, v in r["remaining_holders"].items())
        compiled = f"{r['compiled_step_ratio']:.2f}" if "compiled_step_ratio" in r else "n/a"
        eager = f"{r['step_ratio']:.2f}" if "step_ratio" in r else "n/a"
        print(f"| {name} | {r['saved_ratio']:.3f} | {r['peak_ratio']:.3f} | {eager} | {compiled} "
              f"| {holders} |", flush=True)
        results.append(r)
    if args.out:
        report.write_json(args.out, vars(args), {"results": results}, transformers=transformers.__version__)


if __name__ == "__main__":
    main()
