"""radgrad with and without activation checkpointing, against plain torch with and without it.

Hugging Face models of radgrad.experiments.real_models (random weights, one
training batch of their data), each four ways: plain torch, plain with every
layer checkpointed (``activation_checkpointing_enable()``: torch's
non-reentrant checkpointing), ``radgrad.convert(model, method="quantize")``,
and both. For each: the peak of a forward and backward pass above the
weights (radgrad.memory.peak) and the time of that pass, both over plain
torch's (median of interleaved rounds, one process). ``gpt2-16`` is the
GPT-2 of real_models with 16 layers instead of 4: where saved activations,
not one layer's temporaries, set the peak.

    python benchmarks/bench_checkpointing.py --threads 1 --out results/bench_checkpointing_1thread.json
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import transformers

import radgrad
import interleave
from radgrad.experiments import real_models, report

MODELS = ["gpt2", "gpt2-16", "bert", "vit"]
DEEP = 16
WAYS = {"plain": ("exact", False), "checkpoint": ("exact", True), "radgrad": ("quantize", False),
        "radgrad+checkpoint": ("quantize", True)}


def measure(name: str, rounds: int) -> dict:
    models = {}
    for way, (method, checkpointed) in WAYS.items():
        deep = name.endswith(f"-{DEEP}")
        # converted here, not by build, so that the deeper GPT-2 is converted the same way
        model, spec = real_models.build(name.removesuffix(f"-{DEEP}"), "exact", 0)
        if deep:
            config = copy.deepcopy(model.config)
            config.n_layer = DEEP
            torch.manual_seed(0)
            model = type(model)(config).train()
        if method == "quantize":
            radgrad.convert(model, method="quantize")
        if checkpointed:
            model.activation_checkpointing_enable()  # non-reentrant, a checkpoint per layer
        models[way] = model
    batch = spec.batch(real_models.load_data(spec.data), torch.Generator().manual_seed(0))

    def step(model):
        return lambda: spec.loss(model, batch).backward()

    for model in models.values():
        step(model)()
    peaks = {way: radgrad.memory.peak(step(m), m).added for way, m in models.items()}
    seconds = interleave.median_seconds({way: (step(m), None) for way, m in models.items()}, rounds=rounds)
    return {"model": name, "peak_bytes": peaks, "step_seconds": seconds,
            "peak_ratio": {way: peaks[way] / peaks["plain"] for way in models},
            "step_ratio": {way: seconds[way] / seconds["plain"] for way in models}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    results = []
    print("| model | plain peak | " + " | ".join(f"{w}: peak / time" for w in list(WAYS)[1:]) + " |")
    print("|---|---|" + "---|" * (len(WAYS) - 1))
    for name in args.models:
        r = measure(name, args.rounds)
        cells = [f"{r['peak_ratio'][w]:.3f} / {r['step_ratio'][w]:.2f}" for w in list(WAYS)[1:]]
        print(f"| {name} | {r['peak_bytes']['plain'] / 2**20:.1f} MiB | " + " | ".join(cells) + " |", flush=True)
        results.append(r)
    if args.out:
        report.write_json(args.out, vars(args), {"results": results}, transformers=transformers.__version__)


if __name__ == "__main__":
    main()
