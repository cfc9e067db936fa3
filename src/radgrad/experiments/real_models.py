"""Models people train, with and without radgrad: does ``convert(model, method="quantize")`` train as well?

Byte-level language models (Hugging Face GPT-2, BERT and Llama, an
``nn.TransformerEncoder``) on the Python standard library's own source, and
image models (Hugging Face ViT and ResNet, a diffusion-style denoising
U-Net) on CIFAR-10, built from their configs with random weights. Each run
trains one model ``steps`` steps with AdamW from a seed; the plain and the
converted model of one seed start from the same weights and see the same
batches.

    python -m radgrad.experiments.real_models --models gpt2 resnet --steps 300 --seeds 0 1 --out docs/real_models

Writes ``real_models.json`` (config and every run's per-step losses and
times), ``real_models.csv``, ``real_models.md`` (final losses: the mean of the
last ``--final`` steps' training losses, with its standard error) and
``real_models.png``. Runs are independent (each seeds its own weights,
batches and draws), so seeds may run in parallel processes and be merged
with ``--combine``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from tqdm import tqdm

import radgrad
from radgrad.experiments import plots, report
from radgrad.experiments.data import byte_windows, load_cifar10, stdlib_bytes, to_tensors

__all__ = ["MODELS", "DEFAULT_MODELS", "EncoderLM", "DenoisingUNet", "Spec", "build", "load_data", "train", "main"]

METHODS = ("exact", "quantize")


class EncoderLM(nn.Module):
    """A causal byte-level language model made of ``nn.TransformerEncoder`` layers."""

    def __init__(self, width: int = 256, layers: int = 4, heads: int = 4, context: int = 256,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.position = nn.Embedding(context, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 256)

    def forward(self, x: Tensor) -> Tensor:
        length = x.shape[1]
        h = self.embed(x) + self.position(torch.arange(length, device=x.device))
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=x.device, dtype=h.dtype)
        return self.head(self.encoder(h, mask=mask, is_causal=True))


class _ResidualBlock(nn.Module):
    """Group norm, SiLU and a 3x3 convolution, twice, around a skip connection (a diffusion U-Net's block)."""

    def __init__(self, channels: int, out: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, channels), nn.Conv2d(channels, out, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(8, out), nn.Conv2d(out, out, 3, padding=1)
        self.skip = nn.Conv2d(channels, out, 1) if channels != out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(nn.functional.silu(self.norm2(h)))


class DenoisingUNet(nn.Module):
    """A diffusion model's U-Net in miniature: predicts the noise in an image from the image and its
    noise level (a fourth input channel). Residual blocks of group norms, SiLU and convolutions at
    32, 16 and 8 pixels, strided convolutions down, transposed convolutions up, skip connections by
    concatenation, and self-attention at 8 pixels (``F.scaled_dot_product_attention``)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.stem = nn.Conv2d(4, w, 3, padding=1)
        self.down1, self.pool1 = _ResidualBlock(w, w), nn.Conv2d(w, w, 3, stride=2, padding=1)
        self.down2, self.pool2 = _ResidualBlock(w, 2 * w), nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1)
        self.middle = _ResidualBlock(2 * w, 2 * w)
        self.attention_norm, self.qkv = nn.GroupNorm(8, 2 * w), nn.Conv2d(2 * w, 6 * w, 1)
        self.attention_out = nn.Conv2d(2 * w, 2 * w, 1)
        self.up2, self.block2 = nn.ConvTranspose2d(2 * w, 2 * w, 2, stride=2), _ResidualBlock(4 * w, w)
        self.up1, self.block1 = nn.ConvTranspose2d(w, w, 2, stride=2), _ResidualBlock(2 * w, w)
        self.head = nn.Sequential(nn.GroupNorm(8, w), nn.SiLU(), nn.Conv2d(w, 3, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        h1 = self.down1(self.stem(x))
        h2 = self.down2(self.pool1(h1))
        h = self.middle(self.pool2(h2))
        b, c, height, width = h.shape
        q, k, v = self.qkv(self.attention_norm(h)).flatten(2).transpose(1, 2).view(b, -1, 3, 4, c // 4).unbind(2)
        a = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = h + self.attention_out(a.transpose(1, 2).reshape(b, height * width, c).transpose(1, 2)
                                   .view(b, c, height, width))
        h = self.block2(torch.cat([self.up2(h), h2], 1))
        return self.head(self.block1(torch.cat([self.up1(h), h1], 1)))


@dataclass(frozen=True)
class Spec:
    """A model of this study: how to build it, draw a training batch and compute its loss."""

    description: str
    data: str  # "text" or "cifar"
    build: Callable[[], nn.Module]
    batch: Callable[[Any, torch.Generator], Any]
    loss: Callable[[nn.Module, Any], Tensor]


def _transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


# Hugging Face's own default attention is "sdpa" (F.scaled_dot_product_attention); "eager" writes
# it with torch functions (matmul, softmax, dropout), as older releases and output_attentions do.
def _gpt2(attention: str = "sdpa", vocabulary: int = 256) -> nn.Module:
    t = _transformers()
    return t.GPT2LMHeadModel(t.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=vocabulary, n_positions=256,
                                          bos_token_id=0, eos_token_id=0, attn_implementation=attention))


def _llama(attention: str = "sdpa") -> nn.Module:
    # grouped-query attention (2 key and value heads for 4 query heads), rotary positions, RMS norms,
    # a SiLU-gated MLP: the layout of Llama, Mistral and Qwen2
    t = _transformers()
    return t.LlamaForCausalLM(t.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688,
                                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
                                            attn_implementation=attention))


_MASK = 256  # BERT's [MASK]: the byte vocabulary plus one


def _bert(attention: str = "sdpa") -> nn.Module:
    t = _transformers()
    return t.BertForMaskedLM(t.BertConfig(vocab_size=257, hidden_size=256, num_hidden_layers=4,
                                          num_attention_heads=4, intermediate_size=1024,
                                          max_position_embeddings=128, pad_token_id=0,
                                          attn_implementation=attention))


def _masked(data: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    x = byte_windows(data, 8, 128, g)
    chosen = torch.rand(x.shape, generator=g) < 0.15
    return x.masked_fill(chosen, _MASK), x.masked_fill(~chosen, -100)


def _vit(attention: str = "sdpa") -> nn.Module:
    t = _transformers()
    return t.ViTForImageClassification(t.ViTConfig(image_size=32, patch_size=4, hidden_size=256,
                                                   num_hidden_layers=4, num_attention_heads=4,
                                                   intermediate_size=1024, num_labels=10,
                                                   attn_implementation=attention))


def _resnet() -> nn.Module:
    t = _transformers()
    return t.ResNetForImageClassification(t.ResNetConfig(
        embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[2, 2, 2, 2], layer_type="basic",
        num_labels=10, downsample_in_first_stage=False))


def _images(data: tuple[Tensor, Tensor], g: torch.Generator) -> tuple[Tensor, Tensor]:
    x, y = data
    index = torch.randint(x.shape[0], (32,), generator=g)
    return x[index], y[index]


def _noised(data: tuple[Tensor, Tensor], g: torch.Generator) -> tuple[Tensor, Tensor]:
    """32 images, each mixed with Gaussian noise at a uniform level ``a``: ``(sqrt(1 - a) x + sqrt(a) noise``
    with ``a`` as a fourth channel, ``noise)``."""
    x, _ = _images(data, g)
    level = torch.rand(x.shape[0], 1, 1, 1, generator=g)
    noise = torch.randn(x.shape, generator=g)
    noisy = (1 - level).sqrt() * x + level.sqrt() * noise
    return torch.cat([noisy, level.expand(-1, 1, *x.shape[2:])], 1), noise


def _noise_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, noise = batch
    return nn.functional.mse_loss(model(x), noise)


def _hf_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    key = "input_ids" if x.dtype == torch.long else "pixel_values"
    return model(**{key: x}, labels=y).loss


def _next_byte_loss(model: nn.Module, x: Tensor) -> Tensor:
    logits = model(x[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def _gpt2_batch(data: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    return (byte_windows(data, 8, 256, g),) * 2


MODELS: dict[str, Spec] = {
    "gpt2": Spec("HF GPT-2, 4 layers, 256 wide, batch 8 x 256 bytes", "text", _gpt2, _gpt2_batch, _hf_loss),
    "bert": Spec("HF BERT masked LM, 4 layers, 256 wide, batch 8 x 128 bytes", "text", _bert, _masked, _hf_loss),
    "transformer-encoder": Spec("nn.TransformerEncoder causal LM, 4 layers, 256 wide, batch 8 x 256 bytes",
                                "text", EncoderLM, lambda data, g: byte_windows(data, 8, 257, g),
                                _next_byte_loss),
    "vit": Spec("HF ViT, 32 px, patch 4, 4 layers, 256 wide, batch 32", "cifar", _vit, _images, _hf_loss),
    "resnet": Spec("HF ResNet, basic blocks 2-2-2-2, batch 32", "cifar", _resnet, _images, _hf_loss),
    "unet": Spec("diffusion-style denoising U-Net, 32 wide, 32 px, batch 32", "cifar", DenoisingUNet, _noised,
                 _noise_loss),
    "llama": Spec("HF Llama, 4 layers, 256 wide, 4 query and 2 key-value heads, batch 8 x 256 bytes", "text",
                  _llama, _gpt2_batch, _hf_loss),
    "llama-eager": Spec("llama with attn_implementation='eager'", "text", functools.partial(_llama, "eager"),
                        _gpt2_batch, _hf_loss),
    "gpt2-eager": Spec("gpt2 with attn_implementation='eager'", "text", functools.partial(_gpt2, "eager"),
                       _gpt2_batch, _hf_loss),
    "bert-eager": Spec("bert with attn_implementation='eager'", "text", functools.partial(_bert, "eager"),
                       _masked, _hf_loss),
    "vit-eager": Spec("vit with attn_implementation='eager'", "cifar", functools.partial(_vit, "eager"),
                      _images, _hf_loss),
    # bytes are token ids below 256 of any vocabulary: the larger one changes the output layer and loss
    "gpt2-vocab50257": Spec("gpt2 with GPT-2's own vocabulary of 50257 tokens", "text",
                            functools.partial(_gpt2, vocabulary=50257), _gpt2_batch, _hf_loss),
}
#: What runs when no --models are given: every model in Hugging Face's default attention.
DEFAULT_MODELS = ["gpt2", "bert", "transformer-encoder", "vit", "resnet"]


@cache
def load_data(kind: str) -> Any:
    """A model's training data, loaded once: ``"text"`` (standard-library bytes) or ``"cifar"`` (normalized)."""
    if kind == "text":
        return stdlib_bytes()
    train_x, train_y, _, _ = to_tensors(load_cifar10())
    mean, std = train_x.mean((0, 2, 3), keepdim=True), train_x.std((0, 2, 3), keepdim=True)
    return (train_x - mean) / std, train_y


def build(name: str, method: str, seed: int, bits: int | None = None) -> tuple[nn.Module, Spec]:
    """Model ``name`` initialised from ``seed``, converted for ``method="quantize"`` (with ``bits``, if
    given, for every sketch; else radgrad's per-op defaults)."""
    spec = MODELS[name]
    torch.manual_seed(seed)
    model = spec.build().train()
    if method == "quantize":
        radgrad.convert(model, method="quantize", bits=bits)
    return model, spec


def train(name: str, method: str, seed: int, steps: int, lr: float = 1e-3, progress: bool = False,
          bits: int | None = None) -> dict:
    """Train model ``name`` with ``method`` ("exact" or "quantize", with ``bits`` as :func:`build`) from
    ``seed``; per-step losses and times."""
    if method not in METHODS:
        raise ValueError(f"radgrad: method must be one of {METHODS}, got {method!r}")
    model, spec = build(name, method, seed, bits)
    data = load_data(spec.data)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    batches = torch.Generator().manual_seed(seed)
    losses, seconds = [], []
    for _ in tqdm(range(steps), desc=f"{name} {method} seed {seed}", disable=not progress):
        batch = spec.batch(data, batches)
        start = time.perf_counter()
        loss = spec.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {"model": name, "method": method, "seed": seed, "lr": lr, "bits": bits if method == "quantize" else None,
            "losses": losses, "step_seconds": seconds}


def final_loss(run: dict, last: int) -> float:
    """The mean training loss of the last ``last`` steps of a run."""
    return statistics.fmean(run["losses"][-last:])


def _standard_error(run: dict, last: int) -> float:
    """The standard error of :func:`final_loss` from its steps' spread (batches drawn independently)."""
    tail = run["losses"][-last:]
    return statistics.stdev(tail) / len(tail) ** 0.5


def summarize(runs: list[dict], last: int) -> tuple[str, list[dict]]:
    """A markdown table and CSV rows: final loss by model, method and seed, and the gap to exact."""
    rows, table = [], []
    for name in dict.fromkeys(r["model"] for r in runs):
        finals = {m: {r["seed"]: final_loss(r, last) for r in runs if r["model"] == name and r["method"] == m}
                  for m in METHODS}
        noise = {r["seed"]: _standard_error(r, last) for r in runs if r["model"] == name and r["method"] == "exact"}
        for seed in sorted(finals["exact"]):
            exact, rad = finals["exact"][seed], finals["quantize"].get(seed)
            gap = None if rad is None else rad / exact - 1
            rows.append({"model": name, "seed": seed, "exact": exact, "quantize": rad, "gap": gap,
                         "exact_standard_error": noise[seed]})
        gaps = [r["gap"] for r in rows if r["model"] == name and r["gap"] is not None]
        table.append([name, " / ".join(f"{v:.4f}" for v in finals["exact"].values()),
                      " / ".join(f"{v:.4f}" for v in finals["quantize"].values()),
                      " / ".join(f"{g:+.1%}" for g in gaps), f"{max(map(abs, gaps)):.1%}" if gaps else "n/a",
                      " / ".join(f"{noise[s] / finals['exact'][s]:.1%}" for s in sorted(noise))])
    md = report.markdown(["model", "exact (per seed)", "radgrad quantize (per seed)", "gap per seed",
                          "largest gap", "standard error of the exact final loss"], table)
    return md, rows


def figure(runs: list[dict], title: str) -> Figure:
    """Training loss against step, one panel per model: exact and quantize, mean over seeds, smoothed."""
    names = list(dict.fromkeys(r["model"] for r in runs))
    fig = Figure(figsize=(4.2 * len(names), 3.8), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        for i, method in enumerate(METHODS):
            chosen = [r["losses"] for r in runs if r["model"] == name and r["method"] == method]
            if chosen:
                mean = [statistics.fmean(step) for step in zip(*chosen)]
                ax.plot(plots.smooth(mean, 10), color=f"C{i}", label=method)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (10-step mean)")
        ax.legend()
    fig.suptitle("\n".join(textwrap.wrap(title, 48 * len(names))))  # a single panel is narrow
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--bits", type=int, choices=radgrad.BITS,
                        help="bits of every sketch (default: radgrad's per-op defaults)")
    parser.add_argument("--final", type=int, default=30, help="final loss: mean over this many last steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=Path("docs/real_models"))
    parser.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                        help="train nothing: merge the runs of these real_models.json files (one per seed, "
                             "say, run in parallel) and write the outputs")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.steps < args.final:
        parser.error(f"--steps ({args.steps}) must be at least --final ({args.final})")
    torch.set_num_threads(args.threads)
    if args.combine:
        runs = [run for path in args.combine for run in json.loads(path.read_text())["runs"]]
        args.models = list(dict.fromkeys(r["model"] for r in runs))
        args.seeds = sorted({r["seed"] for r in runs})
        args.steps = min(len(r["losses"]) for r in runs)
        rates = {r["lr"] for r in runs if "lr" in r}  # runs written before runs kept their rate have none
        if len(rates) > 1:
            parser.error(f"--combine: the runs were trained at different learning rates {sorted(rates)}")
        if rates:
            args.lr = rates.pop()
        bits = {r.get("bits") for r in runs if r["method"] == "quantize"}
        if len(bits) > 1:
            parser.error(f"--combine: the runs were converted with different bits {sorted(bits, key=str)}")
        args.bits = bits.pop() if bits else None
    else:
        runs = [train(name, method, seed, args.steps, args.lr, progress=True, bits=args.bits)
                for name in args.models for seed in args.seeds for method in METHODS]
    md, rows = summarize(runs, args.final)
    config = {k: (str(v) if isinstance(v, Path) else [str(p) for p in v] if k == "combine" and v else v)
              for k, v in vars(args).items()}
    header = (f"Command: `python -m radgrad.experiments.real_models {' '.join(argv)}`\n\n"
              f"Config: {json.dumps(config)}\n\n")
    report.write_outputs(args.out, "real_models", header + md, rows)
    (args.out / "real_models.json").write_text(json.dumps({"config": config, "runs": runs}))
    setting = "method='quantize'" + ("" if args.bits is None else f", bits={args.bits}")
    title = f"radgrad convert({setting}) vs exact, {args.steps} steps, lr {args.lr:g}, seeds {args.seeds}"
    figure(runs, title).savefig(args.out / "real_models.png", dpi=110)
    print(md)


if __name__ == "__main__":
    main()
