"""The real-model examples run, and their first step is the exact model's (same weights, same batch)."""

import pytest

from problems import load_example

pytest.importorskip("transformers")


def test_gpt2_example_trains_and_matches_exact_on_its_first_step():
    example = load_example("gpt2_stdlib")
    # without dropout the converted model's forward pass is the plain one's, bit for bit
    small = ["--steps", "2", "--batch", "2", "--context", "64", "--dropout", "0"]
    rad, exact = example.main(small), example.main([*small, "--exact"])
    assert rad[0] == exact[0] and len(rad) == 2


def test_resnet_example_trains_and_matches_exact_on_its_first_step():
    example = load_example("resnet_cifar")
    rad = example.main(["--steps", "2", "--batch", "4"])
    exact = example.main(["--steps", "2", "--batch", "4", "--exact"])
    assert rad[0] == exact[0] and len(rad) == 2
