"""Shared test problems and the statistical check used by every unbiasedness test."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

import radgrad
from radgrad import SketchConfig

#: One config of every estimator (keep 0.3 where a keep applies), quantization
#: alone and on a sample: what the layer and model tests run.
ESTIMATORS = [SketchConfig(0.3, "sample"), SketchConfig(0.3, "sample", False), SketchConfig(0.3, "norm"),
              SketchConfig(0.3, "project"), SketchConfig(0.3, "project", False),
              SketchConfig(method="quantize", bits=2), SketchConfig(0.3, "sample", bits=4)]


class QuickGELU(nn.Module):
    """A model's own activation, written with torch ops: no fused derivative matches it."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def config_id(config: SketchConfig) -> str:
    shared = "" if config.per_example else "-shared"
    bits = "" if config.bits is None else f"-{config.bits}bits"
    return f"{config.method}{shared}{bits}"


def options(config: SketchConfig) -> dict:
    """``config`` as the keyword arguments of radgrad.convert and the radgrad.nn layers."""
    return dict(keep=config.keep, method=config.method, per_example=config.per_example, bits=config.bits)


def channels_last_convnet() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """The paper's convnet in float64 and channels_last, a keep=1 converted copy, and a batch of 4
    channels_last images with labels: ``(model, converted, x, y)``."""
    torch.manual_seed(0)
    model = radgrad.models.cifar_convnet().double().to(memory_format=torch.channels_last)
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64).to(memory_format=torch.channels_last)
    y = torch.randint(10, (4,))
    return model, radgrad.convert(copy.deepcopy(model), keep=1.0), x, y


# A z-score bound for the largest of M per-entry z-scores. Under the null
# (unbiased estimator, N large enough for the CLT) each |z| exceeds 5 with
# probability 5.7e-7, so a Bonferroni bound over M <= 2000 entries gives a
# false-alarm rate below 1.2e-3 for a fixed seed; the seed is fixed, so the
# test is deterministic.
Z_BOUND = 5.0


def small_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def small_convnet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(3, 4, 3, stride=2, dilation=1, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 3),
    )


def problem(kind: str, seed: int = 0):
    """A float64 model, inputs and targets with known shapes."""
    torch.manual_seed(seed)
    if kind == "mlp":
        model, x = small_mlp(), torch.randn(4, 7)
    else:
        model, x = small_convnet(), torch.randn(3, 2, 8, 8)
    y = torch.randint(3, (x.shape[0],))
    return model.double(), x.double(), y


def weight_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Flattened gradients of every weight and bias for one cross-entropy step."""
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([weight_grads(model, x, y) for _ in range(n)])


def z_scores(samples: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Per-entry (mean - exact) / standard error, the standard error measured from the samples.

    An error below ``1e-12`` of the largest ``|exact|`` counts as zero: float64
    rounding inside an estimator (a quantized value rebuilt as ``lo + code *
    step``) is of order 1e-16, far below any bias a test can resolve, yet an
    entry that sits on a quantization level varies by no more than that.
    Entries whose samples do not vary must equal ``exact`` (z = 0 then, inf otherwise).
    """
    n = samples.shape[0]
    err = samples.mean(0) - exact
    err = torch.where(err.abs() <= 1e-12 * exact.abs().max(), 0.0, err)
    se = samples.std(0) / math.sqrt(n)
    constant = se == 0
    z = err.abs() / torch.where(constant, torch.ones_like(se), se)
    return torch.where(constant, torch.where(err == 0, 0.0, math.inf), z)


def assert_unbiased(samples: torch.Tensor, exact: torch.Tensor) -> None:
    """Assert the sample mean is within Z_BOUND standard errors of ``exact``, entry by entry,
    and that the same test would catch a 10% bias of the estimated entries (so it is not vacuous).

    The power is judged on the entries that vary beyond float rounding: an entry stored
    exactly would flag any bias of its own, and so would make a test of the random
    ones look strong whatever their number of samples.
    """
    _assert_unbiased_and_powerful(samples, exact, samples * 0.9, samples.std(0) > 1e-12 * exact.abs().max())


def assert_unbiased_paired(samples: torch.Tensor, exacts: torch.Tensor) -> None:
    """:func:`assert_unbiased` where each draw has its own exact value (``exacts``, one row per
    draw: dropout makes the exact gradient random): the differences must average to zero.
    The power is judged on the entries where the estimate differs from its exact value."""
    differences = samples - exacts
    zero = torch.zeros(samples.shape[1], dtype=samples.dtype)
    _assert_unbiased_and_powerful(differences, zero, 0.9 * samples - exacts,
                                  differences.std(0) > 1e-12 * exacts.abs().max())


def _assert_unbiased_and_powerful(samples: torch.Tensor, exact: torch.Tensor, biased: torch.Tensor,
                                  estimated: torch.Tensor) -> None:
    """``samples`` average to ``exact``, and ``biased`` (the samples with a 10% bias) would not,
    in the ``estimated`` entries."""
    z = z_scores(samples, exact)
    assert z.max() < Z_BOUND, f"max z-score {z.max():.2f} at entry {int(z.argmax())}"
    assert estimated.any(), "no entry varies: nothing here is estimated"
    power = z_scores(biased[:, estimated], exact[estimated]).max()
    assert power > Z_BOUND, f"test too weak to detect a 10% bias (max z {power:.2f})"


def load_example(name: str):
    """Import ``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    qualified = f"radgrad_examples.{name}"
    if qualified not in sys.modules:  # registered, so torch.compile can import it while tracing
        path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(qualified, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = module
        spec.loader.exec_module(module)
    return sys.modules[qualified]


def sketched(x: torch.Tensor, config, *, batch_dims: int) -> torch.Tensor:
    """``unpack(pack(x))`` for the next draw of torch's default generator.

    After the same ``torch.manual_seed``, this is the estimate a RAD op that
    sketches ``x`` reads in its backward pass: the ops pack with
    :func:`radgrad.pack` from that generator.
    """
    return radgrad.unpack(radgrad.pack(x, config, batch_dims=batch_dims))


def assert_same_up_to_rounding(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to a few float64 roundings: one formula summed in another order."""
    assert got.dtype == expected.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def weight_entries(model: nn.Module) -> torch.Tensor:
    """Mask of the weight entries (not the biases) in the order of :func:`weight_grads`.

    RAD estimates the weight gradients only; a bias gradient is the same in
    every draw, so :func:`assert_unbiased` is given the weights alone (a
    constant nonzero entry would make its power check pass trivially).
    """
    return torch.cat([torch.full((p.numel(),), name.rsplit(".", 1)[-1].startswith("weight"))
                      for name, p in model.named_parameters()])


def plan_target():
    """A model and an example batch for ``radgrad plan --model problems:plan_target``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 5))
    return model, (torch.randn(40, 64), torch.randint(5, (40,)))


class UNetBlock(nn.Module):
    """A diffusion U-Net's pieces: group norms, SiLU as a function, a strided convolution down and a
    transposed one up, an instance norm with running statistics."""

    def __init__(self):
        super().__init__()
        self.norm, self.conv = nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3, padding=1)
        self.down, self.up = nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.out = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)

    def forward(self, x):
        h = self.conv(nn.functional.silu(self.norm(x)))
        return self.out(x + self.up(nn.functional.silu(self.down(h))))


class RelativeAttention(nn.Module):
    """Attention scores written with torch.einsum, as XLNet and Funnel write them (the position term
    over an ellipsis, as LongT5 writes its local attention)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.position = nn.Parameter(torch.randn(2, 4))

    def forward(self, x):  # (positions, batch, features)
        q, k, v = (layer(x).view(*x.shape[:2], 2, 4) for layer in (self.q, self.k, self.v))
        scores = torch.einsum("ibnd,jbnd->bnij", q, k) + torch.einsum("i...d,...d->...i", [q, self.position])[..., None]
        return torch.einsum("bnij,jbnd->ibnd", scores.softmax(-1), v).reshape(x.shape)
