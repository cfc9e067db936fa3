"""The real-model examples run, and their first step is the exact model's (same weights, same batch)."""

import io

import numpy as np
import pytest
from PIL import Image

from problems import load_example

pytest.importorskip("transformers")


def test_gpt2_example_trains_and_matches_exact_on_its_first_step():
    example = load_example("gpt2_stdlib")
    # without dropout the converted model's forward pass is the plain one's, bit for bit
    small = ["--steps", "2", "--batch", "2", "--context", "64", "--dropout", "0"]
    rad, exact = example.main(small), example.main([*small, "--exact"])
    assert rad[0] == exact[0] and len(rad) == 2


def test_resnet_example_trains_and_matches_exact_on_its_first_step(tmp_path, monkeypatch):
    # a CIFAR-10-shaped image folder of 30 + 10 random images: tests never read the real data
    from radgrad.experiments import data

    rng = np.random.default_rng(0)
    for split, per_class in (("train", 3), ("test", 1)):
        for name in data.CIFAR10_CLASSES:
            folder = tmp_path / "cifar" / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
                (folder / f"{i}.png").write_bytes(buffer.getvalue())
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "cifar"))
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    example = load_example("resnet_cifar")
    rad = example.main(["--steps", "2", "--batch", "4"])
    exact = example.main(["--steps", "2", "--batch", "4", "--exact"])
    assert rad[0] == exact[0] and len(rad) == 2
