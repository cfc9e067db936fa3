"""radgrad.convert(model, method="quantize") on the models people train, against the same model in plain torch.

Models built from their configs with random weights (Hugging Face GPT-2 with
its Conv1D layers, BERT, ViT, ResNet; nn.TransformerEncoder; an MLP with
GELU, LayerNorm and dropout), one training batch each. For each: the bytes
saved for backward (radgrad.memory.measure) and the peak of a forward and
backward pass above the weights (radgrad.memory.peak), converted over plain;
the time of that pass, converted over plain (median of interleaved rounds,
one process); and the modules holding most of the remaining saved bytes.

    python benchmarks/bench_real_models.py --threads 1 --out results/bench_real_models_1thread.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
import transformers
from torch import nn

import radgrad

transformers.logging.set_verbosity_error()


def gpt2():
    config = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=256, n_positions=256,
                                     bos_token_id=0, eos_token_id=0)
    x = torch.randint(256, (8, 256))
    return transformers.GPT2LMHeadModel(config), lambda m: m(x, labels=x).loss


def bert():
    config = transformers.BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=1024, max_position_embeddings=128)
    x = torch.randint(1000, (8, 128))
    return transformers.BertForMaskedLM(config), lambda m: m(x, labels=x).loss


def vit():
    config = transformers.ViTConfig(image_size=32, patch_size=4, hidden_size=256, num_hidden_layers=4,
                                    num_attention_heads=4, intermediate_size=1024, num_labels=10)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(10, (32,))
    return transformers.ViTForImageClassification(config), lambda m: m(x, labels=y).loss


def resnet():
    config = transformers.ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[2, 2, 2, 2],
                                       layer_type="basic", num_labels=10, downsample_in_first_stage=False)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(10, (32,))
    return transformers.ResNetForImageClassification(config), lambda m: m(x, labels=y).loss


def transformer_encoder():
    layer = nn.TransformerEncoderLayer(256, 4, 1024, 0.1, batch_first=True)
    model = nn.Sequential(nn.Embedding(256, 256), nn.TransformerEncoder(layer, 4, enable_nested_tensor=False),
                          nn.Linear(256, 256))
    x = torch.randint(256, (8, 256))
    return model, lambda m: nn.functional.cross_entropy(m(x).reshape(-1, 256), x.reshape(-1))


def mlp():
    model = nn.Sequential(*(m for _ in range(4) for m in (nn.Linear(512, 512), nn.LayerNorm(512), nn.GELU(),
                                                           nn.Dropout(0.1))), nn.Linear(512, 10))
    x, y = torch.randn(1000, 512), torch.randint(10, (1000,))
    return model, lambda m: nn.functional.cross_entropy(m(x), y)


MODELS = {"gpt2": gpt2, "bert": bert, "vit": vit, "resnet": resnet, "transformer-encoder": transformer_encoder,
          "mlp-gelu-layernorm-dropout": mlp}


def _saved(model, loss) -> radgrad.memory.MemoryRecord:
    with radgrad.memory.record(model) as rec:
        loss(model)
    return rec


def _peak(model, loss) -> int:
    return radgrad.memory.peak(lambda: loss(model).backward(), model).added


def _step_seconds(model, loss) -> float:
    start = time.perf_counter()
    loss(model).backward()
    return time.perf_counter() - start


def measure(name: str, rounds: int) -> dict:
    torch.manual_seed(0)
    plain, loss = MODELS[name]()
    plain.train()
    rad = radgrad.convert(copy.deepcopy(plain), method="quantize")
    saved = {k: _saved(m, loss) for k, m in (("plain", plain), ("radgrad", rad))}
    peaks = {k: _peak(m, loss) for k, m in (("plain", plain), ("radgrad", rad))}
    times: dict[str, list[float]] = {"plain": [], "radgrad": []}
    for m in (plain, rad):
        _step_seconds(m, loss)
    for i in range(rounds):
        order = (("plain", plain), ("radgrad", rad)) if i % 2 == 0 else (("radgrad", rad), ("plain", plain))
        for k, m in order:
            times[k].append(_step_seconds(m, loss))
    holders = Counter()
    for module, nbytes in saved["radgrad"].by_module.items():
        holders[type(rad.get_submodule(module)).__name__ if module not in ("", radgrad.memory.OUTSIDE)
                else module or "(model)"] += nbytes
    total = saved["radgrad"].total
    return {
        "model": name,
        "saved_bytes": {k: r.total for k, r in saved.items()},
        "saved_ratio": total / saved["plain"].total,
        "peak_bytes": peaks,
        "peak_ratio": peaks["radgrad"] / peaks["plain"],
        "step_seconds": {k: statistics.median(v) for k, v in times.items()},
        "step_ratio": statistics.median(times["radgrad"]) / statistics.median(times["plain"]),
        "remaining_holders": {k: v / total for k, v in holders.most_common(4)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    print("| model | saved ratio | peak ratio | step ratio (eager) | what holds the remaining saved bytes |")
    print("|---|---|---|---|---|")
    for name in args.models:
        r = measure(name, args.rounds)
        holders = ", ".join(f"{k} {v:.0%}" for k, v in r["remaining_holders"].items())
        print(f"| {name} | {r['saved_ratio']:.3f} | {r['peak_ratio']:.3f} | {r['step_ratio']:.2f} | {holders} |",
              flush=True)
        results.append(r)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"config": vars(args) | {"out": str(args.out)}, "radgrad": radgrad.__version__,
                "torch": torch.__version__, "transformers": transformers.__version__,
                "machine": f"{platform.machine()} {platform.processor()}".strip()}
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
