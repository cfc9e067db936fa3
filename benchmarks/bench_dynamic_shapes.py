"""Compiling a language model whose sequence length changes: how often, and how long each step takes.

torch.compile makes a size that changed between calls symbolic and compiles
once more; a model that fixes the size again (a Python loop over it)
compiles for every new size, until dynamo's recompile limit (8) sends it back
to eager (NOTE [Blocks under dynamic shapes] in radgrad.blocks). For a plain
and a converted HF GPT-2 (``method="quantize"``), each compiled, this runs one
training step per sequence length and records the wall time of each step and
the number of graphs compiled so far.

    python benchmarks/bench_dynamic_shapes.py --out results/bench_dynamic_shapes.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers
from torch._dynamo.testing import CompileCounterWithBackend

import radgrad


def _gpt2(args: argparse.Namespace) -> torch.nn.Module:
    config = transformers.GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=4, vocab_size=256,
                                     n_positions=max(args.lengths), bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def run(args: argparse.Namespace, converted: bool) -> list[dict]:
    torch.manual_seed(args.seed)
    torch._dynamo.reset()
    model = _gpt2(args)
    if converted:
        radgrad.convert(model, method="quantize")
    counter = CompileCounterWithBackend(args.backend)
    compiled = torch.compile(model, backend=counter)
    steps = []
    for length in args.lengths:
        x = torch.randint(256, (args.batch, length))
        start = time.perf_counter()
        compiled(x, labels=x).loss.backward()
        steps.append({"length": length, "seconds": time.perf_counter() - start, "graphs": counter.frame_count})
        print(f"{'radgrad' if converted else 'plain'} length {length}: {steps[-1]['seconds']:.2f} s, "
              f"{counter.frame_count} graphs so far", flush=True)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[300, 310, 320, 330, 340, 350])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--backend", default="aot_eager", help="torch.compile backend (inductor takes minutes)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(),
              "plain": run(args, converted=False), "radgrad": run(args, converted=True)}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
