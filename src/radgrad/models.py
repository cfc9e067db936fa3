"""The paper's feedforward models, as plain torch modules (convert them with radgrad.convert)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["mnist_mlp", "cifar_convnet", "irnn_init_", "smnist_irnn", "SequenceClassifier"]


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


def irnn_init_(rnn: nn.RNN, std: float = 1e-3) -> nn.RNN:
    """The IRNN initialisation (Le et al. 2015), in place: identity recurrent weights,
    input weights drawn from N(0, std^2), zero biases. Returns ``rnn``."""
    with torch.no_grad():
        for name, param in rnn.named_parameters():
            if name.startswith("weight_hh"):
                nn.init.eye_(param)
            elif name.startswith("weight_ih"):
                nn.init.normal_(param, std=std)
            else:
                nn.init.zeros_(param)
    return rnn


class SequenceClassifier(nn.Module):
    """An RNN over a sequence, then a linear read-out of its last state.

    Takes ``(B, T * features)`` or ``(B, T, features)``; returns logits.
    """

    def __init__(self, features: int, hidden: int, classes: int, nonlinearity: str = "relu") -> None:
        super().__init__()
        self.features = features
        self.rnn = nn.RNN(features, hidden, nonlinearity=nonlinearity, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1, self.features)
        _, h_n = self.rnn(x)
        return self.head(h_n[-1])


def smnist_irnn(pixels_per_step: int = 1, hidden: int = 100, std: float = 1e-3) -> SequenceClassifier:
    """The sequential-MNIST IRNN: a ReLU RNN reading ``pixels_per_step`` pixels per step
    (1: 784 steps, as in the paper; 28: one row per step), hidden 100, IRNN
    initialisation, input and read-out weights from N(0, std^2)."""
    model = SequenceClassifier(pixels_per_step, hidden, 10)
    irnn_init_(model.rnn, std)
    with torch.no_grad():
        nn.init.normal_(model.head.weight, std=std)
        nn.init.zeros_(model.head.bias)
    return model
