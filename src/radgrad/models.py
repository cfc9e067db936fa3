"""The paper's feedforward models, as plain torch modules (convert them with radgrad.convert)."""

from __future__ import annotations

from torch import nn

__all__ = ["mnist_mlp", "cifar_convnet"]


def mnist_mlp(hidden: int = 300, depth: int = 3) -> nn.Sequential:
    """The MNIST fully connected net: 784-300-300-300-10 with ReLU; returns logits.

    Takes images of shape ``(B, 1, 28, 28)`` or ``(B, 784)``.
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width = 28 * 28
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def cifar_convnet() -> nn.Sequential:
    """The CIFAR-10 convnet; takes ``(B, 3, 32, 32)`` images, returns logits.

    conv 3->16, conv 16->32, avg-pool 2, conv 32->32, conv 32->32, avg-pool 2,
    linear 2048->10; 5x5 kernels with padding 2 and a ReLU after each conv.
    """

    def conv(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 5, padding=2), nn.ReLU()]

    return nn.Sequential(
        *conv(3, 16), *conv(16, 32), nn.AvgPool2d(2),
        *conv(32, 32), *conv(32, 32), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
    )
