"""A byte-level LSTM or GRU language model on the standard library's source: memory, step time and training loss.

    python benchmarks/bench_gated_rnn.py --cell lstm --out results/bench_lstm.json
    python benchmarks/bench_gated_rnn.py --cell gru --out results/bench_gru.json

An embedding of the 256 byte values (64 wide), a two-layer ``nn.LSTM`` or
``nn.GRU`` (256 hidden units) and a linear head, trained on windows of 128 bytes, batch 32,
with Adam (lr 2e-3), one thread; plain torch against
``radgrad.convert(model, method="quantize")``. Reported: bytes saved for
backward and the step's peak of live tensors (``radgrad.memory``), the median
step time over interleaved steps, and the training loss (mean of the last 20
steps) after ``--steps`` steps for each seed, both models fed the same windows.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import radgrad
from radgrad.experiments import report
from radgrad.experiments.data import byte_windows, stdlib_bytes

BATCH, LENGTH = 32, 128


class ByteRNN(nn.Module):
    def __init__(self, cell: str = "lstm", width: int = 64, hidden: int = 256, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](width, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 256)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(ids))[0])


def _loss(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    logits = model(window[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, 256), window[:, 1:].reshape(-1))


def _train(models: dict[str, nn.Module], text: torch.Tensor, steps: int, seed: int) -> dict:
    """Train each model on the same windows; losses and step seconds, steps interleaved."""
    optimizers = {k: torch.optim.Adam(m.parameters(), lr=2e-3) for k, m in models.items()}
    generator = torch.Generator().manual_seed(seed)
    losses: dict[str, list[float]] = {k: [] for k in models}
    seconds: dict[str, list[float]] = {k: [] for k in models}
    for i in range(steps):
        window = byte_windows(text, BATCH, LENGTH + 1, generator)
        for name in (list(models) if i % 2 == 0 else list(models)[::-1]):
            start = time.perf_counter()
            optimizers[name].zero_grad(set_to_none=True)
            loss = _loss(models[name], window)
            loss.backward()
            optimizers[name].step()
            seconds[name].append(time.perf_counter() - start)
            losses[name].append(loss.item())
    return {"final_loss": {k: statistics.mean(v[-20:]) for k, v in losses.items()},
            "step_seconds": {k: statistics.median(v[5:]) for k, v in seconds.items()}, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", choices=["lstm", "gru"], default="lstm")
    parser.add_argument("--steps", type=int, default=300, help="training steps per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    text = stdlib_bytes()
    runs = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        plain = ByteRNN(args.cell)
        models = {"plain": plain, "radgrad": radgrad.convert(copy.deepcopy(plain), method="quantize")}
        window = byte_windows(text, BATCH, LENGTH + 1, torch.Generator().manual_seed(seed))
        saved = {k: radgrad.memory.saved_bytes(m, window[:, :-1]) for k, m in models.items()}
        peaks = {k: radgrad.memory.peak(lambda m=m: _loss(m, window).backward(), m).peak for k, m in models.items()}
        run = {"seed": seed, "saved_bytes": saved, "peak_bytes": peaks, **_train(models, text, args.steps, seed)}
        runs.append(run)
        step, final = run["step_seconds"], run["final_loss"]
        print(f"seed {seed}: saved {saved['radgrad'] / saved['plain']:.3f}, "
              f"peak {peaks['radgrad'] / peaks['plain']:.3f}, "
              f"step {step['radgrad'] / step['plain']:.2f}x ({step['plain'] * 1e3:.0f} ms plain), final loss "
              f"{final['plain']:.4f} plain, {final['radgrad']:.4f} radgrad "
              f"({final['radgrad'] / final['plain'] - 1:+.2%})", flush=True)
    if args.out:
        report.write_json(args.out, vars(args), {"runs": runs})


if __name__ == "__main__":
    main()
