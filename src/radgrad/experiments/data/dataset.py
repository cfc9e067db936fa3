"""The in-memory forms of a dataset: uint8 numpy arrays, and float tensors for training."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import torch


def check_labels(labels: np.ndarray, n_classes: int, where: str) -> None:
    """Raise a ValueError naming ``where`` and a bad value if a label is outside ``0..n_classes-1``."""
    bad = labels[(labels < 0) | (labels >= n_classes)]
    if bad.size:
        raise ValueError(
            f"radgrad: {where} has labels outside 0..{n_classes - 1}: {int(bad[0])} "
            f"({bad.size} of {labels.size})"
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image dataset split into train and test, as numpy arrays.

    Attributes:
        train_x: uint8 images, ``(N, H, W)`` for grayscale or ``(N, H, W, C)``.
        train_y: int64 class indices, shape ``(N,)``.
        test_x: uint8 images laid out like ``train_x``.
        test_y: int64 class indices, shape ``(M,)``.
        classes: class names; label ``k`` means ``classes[k]``.

    Raises:
        ValueError: if an array has the wrong dtype or shape, or a label is
            outside ``0..len(classes)-1``.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != np.uint8 or x.ndim not in (3, 4) or x.shape[1:] != self.train_x.shape[1:]:
                raise ValueError(
                    f"radgrad: {split}_x must be uint8 (N, H, W[, C]) like train_x, got {x.dtype} {x.shape}"
                )
            if y.dtype != np.int64 or y.shape != x.shape[:1]:
                raise ValueError(f"radgrad: {split}_y must be int64 ({len(x)},), got {y.dtype} {y.shape}")
            check_labels(y, len(self.classes), f"{split}_y")


class Tensors(NamedTuple):
    """Float tensors ready for training, as returned by :func:`to_tensors`."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def to_tensors(ds: Dataset, device: torch.device | str | None = None) -> Tensors:
    """Turn a :class:`Dataset` into float tensors for training.

    Images become float32 in ``[0, 1]`` in NCHW layout: MNIST gives
    ``(N, 1, 28, 28)`` (flatten with ``x.flatten(1)`` for an MLP) and CIFAR-10
    ``(N, 3, 32, 32)``. No mean/std normalisation is applied. Labels become int64.

    Args:
        ds: the dataset.
        device: torch device for the tensors (default: CPU).

    Returns:
        A :class:`Tensors` ``(train_x, train_y, test_x, test_y)``.
    """

    def images(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.require(x, requirements=["C", "W"])).to(device)
        t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2).contiguous()  # uint8: cheap
        return t.to(torch.float32).div_(255)

    def labels(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.require(y, np.int64, ["C", "W"])).to(device)

    return Tensors(images(ds.train_x), labels(ds.train_y), images(ds.test_x), labels(ds.test_y))
