"""The ``radgrad`` command line end to end, on tiny data files written here."""

from __future__ import annotations

import csv
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from radgrad.experiments import cli
from radgrad.experiments.cli import main
from radgrad.experiments.train import CHECKPOINT, CURVE, RESULT
from test_train import _private_cache_one_thread, write_tiny_cifar, write_tiny_mnist  # noqa: F401  (fixture)

COMMANDS = ["train", "compare", "memory", "variance", "reactor", "lcg-variance", "demo"]


@pytest.fixture
def mnist(tmp_path: Path) -> Path:
    return write_tiny_mnist(tmp_path / "mnist.pkl.gz")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_subcommand(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = {**{k: v[0] for k, v in cli.EXTERNAL.items()}, "demo": "radgrad.experiments.demo"}.get(command)
    if module:
        pytest.importorskip(module)
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and ("radgrad" in out.splitlines()[0])
    if command in ("train", "compare", "memory", "variance"):
        assert f"usage: radgrad {command}" in out and "--out" in out


def test_top_level_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--task", "mlp", "--method", "baseline", "--out", "x"],
     r"argument --task: radgrad: unknown task 'mlp'; valid tasks: mnist-mlp, cifar-cnn, smnist-irnn, smnist-rows"),
    (["compare", "--task", "mnist-mlp", "--methods", "baseline", "rad", "--out", "x"],
     r"argument --methods: radgrad: unknown method 'rad'; valid methods: baseline, reduced-batch, project"),
    (["memory", "--keeps", "0"], r"argument --keeps: radgrad: keep must be in \(0, 1\], got '0'"),
    (["variance", "--task", "mnist-mlp", "--methods", "baseline"], r"argument --methods: invalid choice: 'baseline'"),
    (["train", "--task", "mnist-mlp", "--method", "project", "--out", "x", "--bogus"],
     r"unrecognized arguments: --bogus"),
])  # fmt: skip
def test_bad_names_and_values(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_runtime_errors_are_reported(tmp_path: Path, mnist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--task", "mnist-mlp", "--method", "baseline", "--iters", "0", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("radgrad: iters must be an integer >= 1, got 0")
    assert main([*argv[:-4], "--iters", "1", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "r")]) == 2
    assert "radgrad: MNIST source" in capsys.readouterr().err


def _run_args(task: str, data: Path, out: Path, *extra: str) -> list[str]:
    small = ["--batch", "2", "--eval-size", "4"] if task == "smnist-irnn" else ["--batch", "6"]
    return ["--task", task, "--iters", "3", "--eval-every", "2", "--data", str(data), "--out", str(out),
            "--no-progress", *small, *extra]


@pytest.mark.parametrize("task", ["mnist-mlp", "smnist-rows", "smnist-irnn", "cifar-cnn"])
def test_train_each_task(task: str, tmp_path: Path, mnist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_tiny_cifar(tmp_path / "cifar-10-batches-py") if task == "cifar-cnn" else mnist
    out = tmp_path / "run"
    assert main(["train", *_run_args(task, source, out), "--method", "different-sample"]) == 0
    assert f"{task} different-sample seed 0: batch" in capsys.readouterr().out
    result = json.loads((out / RESULT).read_text())
    assert result["config"]["task"] == task and result["config"]["data"] == str(source)
    assert len(result["losses"]) == 3 and all(loss > 0 for loss in result["losses"])
    assert (out / CURVE).read_text().count("\n") == 5 and (out / CHECKPOINT).exists()


def test_train_stop_and_resume_cli(tmp_path: Path, mnist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", *_run_args("smnist-rows", mnist, tmp_path / "a"), "--method", "same-sample", "--iters", "6"]
    assert main(args) == 0
    args_b = [a if a != str(tmp_path / "a") else str(tmp_path / "b") for a in args]
    assert main([*args_b, "--stop-after", "3"]) == 0
    assert "radgrad: stopped after 3 of 6 iterations" in capsys.readouterr().err
    assert main([*args_b, "--resume"]) == 0
    a, b = (torch.load(tmp_path / d / CHECKPOINT, weights_only=True) for d in "ab")
    assert a["history"]["losses"] == b["history"]["losses"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_compare(tmp_path: Path, mnist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", *_run_args("mnist-mlp", mnist, out), "--methods", "baseline", "reduced-batch",
            "different-sample", "--seeds", "0", "1"]
    assert main(argv) == 0
    md = capsys.readouterr().out
    assert "| method | batch | saved MB |" in md and "| different-sample | 6 |" in md
    for name in ("compare.png", "compare.md", "compare.csv"):
        assert (out / name).stat().st_size > 0
    rows = list(csv.DictReader((out / "compare.csv").read_text().splitlines()))
    assert [r["method"] for r in rows] == ["baseline", "reduced-batch", "different-sample"]
    assert int(rows[1]["batch"]) < 6 and rows[0]["seeds"] == "2"
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*-seed*/result.json")}
    assert len(stamps) == 6
    assert main(argv) == 0  # finished runs are read back, not rerun
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}


def test_memory_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["memory", "--keeps", "1", "0.1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for paper in ("2.69", "1.80", "23.08", "3.28", "47.93", "7.01"):
        assert f"| {paper} |" in out
    assert "random inputs" in out and "depends on shapes, not values" in out
    rows = json.loads((tmp_path / "memory.json").read_text())["rows"]
    mlp = {r["keep"]: r for r in rows if r["task"] == "mnist-mlp"}
    assert mlp[1.0]["total_mb"] == pytest.approx(2.69, rel=0.02)
    assert mlp[0.1]["total_mb"] == pytest.approx(1.80, rel=0.02)
    assert mlp["torch"]["saved_bytes"] == 150 * (784 + 3 * 300) * 4
    assert (tmp_path / "memory.md").exists() and (tmp_path / "memory.csv").exists()


def test_variance_command(tmp_path: Path, mnist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["variance", "--task", "mnist-mlp", "--draws", "3", "--reference", "24", "--batch", "6",
            "--methods", "project", "different-sample", "--data", str(mnist), "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Relative variance E‖ĝ − g‖² / ‖g_ref‖²" in out
    assert "| different-sample (RAD + minibatch) | 6 |" in out and "| reduced-batch (minibatch) |" in out
    for name in ("variance.png", "variance.md", "variance.csv", "variance.json"):
        assert (tmp_path / name).stat().st_size > 0


# ---------------------------------------------------------------- subcommands implemented elsewhere


def test_external_command_passthrough(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    fake = types.ModuleType("fake_reactor")
    fake.add_arguments = lambda p: p.add_argument("--iters", type=int, default=1)  # type: ignore[attr-defined]
    fake.run = lambda args: seen.setdefault("iters", args.iters) and 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "radgrad.experiments.reactor_cli", fake)
    assert main(["reactor", "--iters", "7"]) == 0
    assert seen == {"iters": 7}


def test_external_command_missing_or_broken(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "radgrad.experiments.lcg_cli", None)
    assert main(["lcg-variance", "--reps", "2"]) == 2
    assert capsys.readouterr().err.startswith(
        "radgrad: the 'lcg-variance' command is not available: module radgrad.experiments.lcg_cli is missing")
    broken = types.ModuleType("broken")
    monkeypatch.setitem(sys.modules, "radgrad.experiments.reactor_cli", broken)
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: 1 / 0)
    assert main(["reactor"]) == 2
    assert "radgrad: the 'reactor' command cannot run: importing radgrad.experiments.reactor_cli failed: " \
           "ZeroDivisionError" in capsys.readouterr().err
    assert main(["memory", "--tasks", "mnist-mlp", "--keeps", "1"]) == 0  # the rest of the CLI still works
