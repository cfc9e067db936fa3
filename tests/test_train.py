"""Tests for the experiment registries, the memory budget, the training loop and exact resumption."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import radgrad
from radgrad.experiments import budget, data, tasks, variance
from radgrad.experiments.data import Tensors
from radgrad.experiments.steps import Stepper
from radgrad.experiments.tasks import METHODS, TASKS, get_method, get_task
from radgrad.experiments.train import CHECKPOINT, CURVE, RESULT, RunConfig, RunDiverged, RunStopped, fit, train

pytestmark = pytest.mark.usefixtures("private_cache_one_thread")


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
    assert list(METHODS) == ["baseline", "reduced-batch", "project", "same-sample", "different-sample",
                             "accumulate", "checkpoint", "quantize", "quantize-1", "quantize-4", "allocate", "norm"]
    # methods beyond the paper borrow the tuned settings of the closest paper method
    assert get_task("mnist-mlp").lr_wd("quantize") == get_task("mnist-mlp").lr_wd("baseline")
    assert get_task("cifar-cnn").lr_wd("norm") == get_task("cifar-cnn").lr_wd("different-sample")
    assert get_method("quantize").config(0.1) == radgrad.SketchConfig(method="quantize", bits=2)
    assert get_method("quantize-4").config(0.1) == radgrad.SketchConfig(method="quantize", bits=4)
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
                                              ("mnist-mlp", "reduced-batch"), ("mnist-mlp", "allocate")])
def test_stop_and_resume_is_bitwise_identical(tmp_path: Path, task: str, method: str, tiny_tensors: Tensors) -> None:
    config = _config(task=task, method=method)
    tensors = tiny_tensors
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


def test_outputs_name_the_config(tmp_path: Path, tiny_tensors: Tensors) -> None:
    result = train(_config(iters=10, lr=1e-3), tmp_path, data=tiny_tensors, progress=False)
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


def test_allocate_fits_the_paper_estimators_bytes_and_records_its_choice(tiny_tensors: Tensors) -> None:
    runs = {m: train(_config(method=m, iters=2), None, data=tiny_tensors, progress=False)
            for m in ("different-sample", "quantize", "allocate")}
    assert runs["allocate"]["saved_bytes"] <= runs["different-sample"]["saved_bytes"]
    chosen = runs["allocate"]["allocation"]
    assert list(chosen) == ["1", "3", "5", "7"]  # the four linear layers of the MLP
    # the budget buys more than 2-bit quantization everywhere would
    assert runs["allocate"]["saved_bytes"] > runs["quantize"]["saved_bytes"]
    assert runs["quantize"]["allocation"] is None


def test_existing_runs_are_protected(tmp_path: Path, tiny_tensors: Tensors) -> None:
    tensors = tiny_tensors
    first = train(_config(), tmp_path, data=tensors, progress=False)
    with pytest.raises(ValueError, match=r"already holds a run; pass --resume"):
        train(_config(), tmp_path, data=tensors, progress=False)
    with pytest.raises(ValueError, match=r"holds a run with another config \(lr: 0.000934 there, 0.5 now\)"):
        train(_config(lr=0.5), tmp_path, data=tensors, progress=False, resume=True)
    assert train(_config(), tmp_path, data=tensors, progress=False, resume=True) == json.loads(json.dumps(first))
    again = train(_config(), tmp_path, data=tensors, progress=False, overwrite=True)
    assert again["losses"] == first["losses"]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(("field", "value", "message"), [
    ("lr", math.nan, r"lr must be a finite number > 0, got nan"),
    ("lr", math.inf, r"lr must be a finite number > 0, got inf"),
    ("lr", 0.0, r"lr must be a finite number > 0, got 0.0"),
    ("weight_decay", math.nan, r"weight-decay must be a finite number >= 0, got nan"),
    ("weight_decay", -1e-3, r"weight-decay must be a finite number >= 0, got -0.001"),
    ("seed", -1, r"seed must be an integer from 0 to 9223372036854775807, got -1"),
    ("seed", 2**63, r"seed must be an integer from 0 to 9223372036854775807, got 9223372036854775808"),
    ("seed", 1.0, r"seed must be an integer from 0 to 9223372036854775807, got 1.0"),
    ("threads", 0, r"threads must be an integer from 1 to 1024, got 0"),
    ("eval_size", 0, r"eval-size must be an integer >= 1, got 0"),
    ("eval_every", -2, r"eval-every must be an integer >= 1, got -2"),
    ("batch", True, r"batch must be an integer >= 1, got True"),
    ("keep", math.nan, r"keep must be in \(0, 1\], got nan"),
])  # fmt: skip
def test_config_values_are_checked(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=f"^radgrad: {message}$"):
        dataclasses.replace(_config(), **{field: value}).resolved()


@pytest.mark.parametrize(("option", "message"), [
    ({"stop_after": 0}, r"stop-after must be an integer >= 1, got 0"),
    ({"checkpoint_seconds": math.nan}, r"checkpoint-seconds must be a finite number >= 0, got nan"),
    ({"checkpoint_seconds": -1.0}, r"checkpoint-seconds must be a finite number >= 0, got -1.0"),
])  # fmt: skip
def test_train_options_are_checked_first(tmp_path: Path, tiny_tensors: Tensors, option: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^radgrad: {message}$"):
        train(_config(), tmp_path / "run", data=tiny_tensors, progress=False, **option)
    assert not (tmp_path / "run").exists()


def test_out_must_be_a_folder(tmp_path: Path, tiny_tensors: Tensors) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    for out in (blocker, blocker / "run"):
        message = (f"^radgrad: out must be a folder or a path where one can be created, "
                   rf"got {re.escape(repr(str(out)))} \({re.escape(str(blocker))} is a file\)$")
        with pytest.raises(ValueError, match=message):
            train(_config(), out, data=tiny_tensors, progress=False)
    assert blocker.read_text() == "mine"


def _unreadable(path: Path, detail: str) -> str:
    return (rf"^radgrad: cannot read the run file {re.escape(str(path))} \({detail}\): it is damaged or was not "
            rf"written by radgrad; pass --overwrite to discard the run in {re.escape(str(path.parent))} and start "
            r"afresh, or choose another --out$")


@pytest.mark.parametrize(("damage", "detail"), [
    ("garbage", r"UnpicklingError: .+"),
    ("empty", r"EOFError"),
    ("truncated", r"RuntimeError: .+"),
    ("not a checkpoint", r"not a radgrad checkpoint"),
    ("another model", r"RuntimeError: Error\(s\) in loading state_dict .+"),
])  # fmt: skip
def test_resume_from_a_damaged_checkpoint(tmp_path: Path, tiny_tensors: Tensors, damage: str, detail: str) -> None:
    config = _config()
    with pytest.raises(RunStopped):
        train(config, tmp_path, data=tiny_tensors, progress=False, stop_after=4)
    ckpt = tmp_path / CHECKPOINT
    whole = ckpt.read_bytes()
    if damage == "not a checkpoint":
        torch.save({"weights": torch.ones(3)}, ckpt)
    elif damage == "another model":
        state = torch.load(ckpt, weights_only=True)
        torch.save({**state, "model": {"weight": torch.ones(3)}}, ckpt)
    else:
        damaged = {"garbage": b"not a checkpoint\n", "empty": b"", "truncated": whole[: len(whole) // 2]}
        ckpt.write_bytes(damaged[damage])
    with pytest.raises(ValueError, match=_unreadable(ckpt, detail)):
        train(config, tmp_path, data=tiny_tensors, progress=False, resume=True)
    assert len(train(config, tmp_path, data=tiny_tensors, progress=False, overwrite=True)["losses"]) == 8


@pytest.mark.parametrize(("text", "detail"), [("{", r"JSONDecodeError: .+"), ("[1, 2]", "not a radgrad result")])
def test_resume_from_a_damaged_result(tmp_path: Path, tiny_tensors: Tensors, text: str, detail: str) -> None:
    train(_config(), tmp_path, data=tiny_tensors, progress=False)
    (tmp_path / RESULT).write_text(text)
    with pytest.raises(ValueError, match=_unreadable(tmp_path / RESULT, detail)):
        train(_config(), tmp_path, data=tiny_tensors, progress=False, resume=True)


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path: Path, tiny_tensors: Tensors) -> None:
    config = _config(lr=1e30)
    message = (r"^radgrad: the run diverged at iteration 2 of 8: the training loss is nan \(lr 1e\+30, "
               r"weight-decay 1.25e-06\); try a smaller --lr or --weight-decay")
    kept = rf"; {re.escape(str(tmp_path / CHECKPOINT))} holds iteration 1, before the divergence \(pass --overwrite"
    with pytest.raises(RunDiverged, match=message + kept):
        train(config, tmp_path, data=tiny_tensors, progress=False, checkpoint_seconds=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]  # no result, no curve
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["iteration"] == 1 and all(bool(torch.isfinite(v).all()) for v in state["model"].values())
    with pytest.raises(RunDiverged, match=message + kept):  # resuming diverges at the same iteration
        train(config, tmp_path, data=tiny_tensors, progress=False, resume=True)
    with pytest.raises(RunDiverged, match=message + "$"):  # in memory: nothing to keep
        fit(config, tiny_tensors, progress=False)


@pytest.mark.parametrize(("task", "lr", "weight_decay", "what"), [
    ("mnist-mlp", 1e39, None, "the optimizer step overflowed"),  # lr too large for float32
    ("smnist-rows", 100.0, 3e38, "the parameters are not finite"),  # SGD's step overflows to inf
])  # fmt: skip
def test_divergence_in_the_first_step(tmp_path: Path, tiny_tensors: Tensors, task: str, lr: float,
                                      weight_decay: float | None, what: str) -> None:
    config = _config(task=task, method="baseline", lr=lr, weight_decay=weight_decay)
    message = (rf"^radgrad: the run diverged at iteration 1 of 8: {what} .*; "
               rf"nothing was saved in {re.escape(str(tmp_path))}$")
    with pytest.raises(RunDiverged, match=message):
        train(config, tmp_path, data=tiny_tensors, progress=False, checkpoint_seconds=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_killed_process_resumes_bitwise(tmp_path: Path, tiny_mnist: Path) -> None:
    """Kill a real training process (SIGKILL) after its first checkpoint; resume; compare."""
    iters = 120  # checkpoints after every iteration: far more time than the kill below needs
    options = ["--task", "mnist-mlp", "--method", "same-sample", "--iters", str(iters), "--batch", "8",
               "--eval-every", "20", "--data", str(tiny_mnist), "--no-progress"]
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
    assert torch.load(killed / CHECKPOINT, weights_only=True)["iteration"] < iters
    assert not (killed / RESULT).exists()
    from radgrad.experiments.cli import main

    assert main(["train", *options, "--out", str(killed), "--resume"]) == 0
    assert main(["train", *options, "--out", str(tmp_path / "whole")]) == 0
    a, b = (json.loads((tmp_path / d / RESULT).read_text()) for d in ("whole", "killed"))
    _assert_same_run(a, b, tmp_path / "whole", killed)


# ---------------------------------------------------------------- variance


def test_variance_study_definitions(tiny_tensors: Tensors) -> None:
    config = variance.VarianceConfig("mnist-mlp", keep=1.0, draws=3, reference=20, batch=6,
                                     methods=("different-sample",))
    result = variance.study(config, data=tiny_tensors, progress=False)
    rows = {(r["estimator"], r["layer"]): r for r in result["rows"]}
    assert result["reduced_batch"] == 6  # keep 1: the same memory as the full batch
    # at keep 1 RAD is exact: no variance from RAD's sampling alone
    assert rows[("different-sample (RAD only)", variance.ALL)]["relative_variance"] == 0.0
    assert rows[("baseline (minibatch)", "1.weight")]["relative_variance"] > 0
    assert {r["layer"] for r in result["rows"]} == {"1.weight", "3.weight", "5.weight", "7.weight", variance.ALL}
    with pytest.raises(ValueError, match=r"radgrad: variance compares RAD methods .* got 'baseline'"):
        variance.VarianceConfig("mnist-mlp", methods=("baseline",)).check()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("draws", 1, r"draws must be an integer >= 2, got 1"),
    ("warmup", -1, r"warmup must be an integer >= 0, got -1"),
    ("reference", 0, r"reference must be an integer >= 1, got 0"),
    ("batch", 0, r"batch must be an integer >= 1, got 0"),
    ("seed", -1, r"seed must be an integer from 0 to 9223372036854775807, got -1"),
    ("threads", 2000, r"threads must be an integer from 1 to 1024, got 2000"),
    ("keep", math.inf, r"keep must be in \(0, 1\], got inf"),
])  # fmt: skip
def test_variance_config_is_checked(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=f"^radgrad: {message}$"):
        variance.VarianceConfig("mnist-mlp", **{field: value}).check()


def test_tasks_module_public_names() -> None:
    assert tasks.EXACT_KEEP == 1.0 and tasks.PAPER_KEEPS == (1.0, 0.8, 0.5, 0.3, 0.1, 0.05)


@pytest.mark.parametrize("stepper", [Stepper(micro=3), Stepper(micro=4), Stepper(segments=2), Stepper(segments=3)],
                         ids=["micro-3", "micro-4-uneven", "checkpoint-2", "checkpoint-3"])
def test_accumulation_and_checkpointing_give_the_minibatch_gradient(stepper: Stepper) -> None:
    # exact methods: the gradient of the mean loss over the whole minibatch, up to float64 rounding
    torch.manual_seed(0)
    model = radgrad.convert(radgrad.models.mnist_mlp(hidden=20), keep=1.0).double()
    x, y = torch.rand(10, 1, 28, 28, dtype=torch.float64), torch.randint(10, (10,))
    loss = Stepper().backward(model, x, y)
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    got_loss = stepper.backward(model, x, y)
    torch.testing.assert_close(got_loss, loss, rtol=1e-12, atol=0)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-14)


def test_checkpointing_needs_a_sequential_model() -> None:
    with pytest.raises(ValueError, match="radgrad: checkpointing cuts an nn.Sequential model into segments; "
                                         "got SequenceClassifier"):
        Stepper(segments=2).backward(radgrad.models.smnist_irnn(28), torch.rand(2, 1, 28, 28), torch.zeros(2).long())


def test_write_json_records_its_config_and_environment(tmp_path):
    from radgrad.experiments import report

    path = tmp_path / "new" / "result.json"
    report.write_json(path, {"rounds": 3, "models": ["gpt2"], "out": path, "threads": None},
                      {"results": [1.5]}, transformers="5.23.0")
    written = json.loads(path.read_text())
    assert written["results"] == [1.5]
    # JSON's own values kept as they are, a path as its text
    assert written["meta"]["config"] == {"rounds": 3, "models": ["gpt2"], "out": str(path), "threads": None}
    assert written["meta"]["transformers"] == "5.23.0"
    assert written["meta"]["torch"] == torch.__version__ and "cpu_capability" in written["meta"]
