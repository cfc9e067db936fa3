"""The ``radgrad`` command line end to end, on tiny data files written here."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import radgrad
from radgrad.experiments import cli, demo, options
from radgrad.experiments.cli import main
from radgrad.experiments.data import Tensors
from radgrad.experiments.train import CHECKPOINT, CURVE, RESULT, RunConfig, train

pytestmark = pytest.mark.usefixtures("private_cache_one_thread")

COMMANDS = ["train", "compare", "memory", "variance", "reactor", "lcg-variance", "demo"]
SEED_RULE = "an integer from 0 to 9223372036854775807"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_subcommand(command: str, capsys: pytest.CaptureFixture[str]) -> None:
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


def test_runtime_errors_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--task", "mnist-mlp", "--method", "baseline", "--iters", "1", "--data", str(tmp_path / "absent"),
            "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("radgrad: MNIST source")


# ---------------------------------------------------------------- numeric and path options, checked at parsing

TRAIN = ["train", "--task", "mnist-mlp", "--method", "baseline", "--out", "unused"]


@pytest.mark.parametrize(("argv", "option", "rule", "got"), [
    ([*TRAIN, "--lr", "nan"], "lr", "a finite number > 0", "nan"),
    ([*TRAIN, "--lr", "inf"], "lr", "a finite number > 0", "inf"),
    ([*TRAIN, "--lr", "0"], "lr", "a finite number > 0", "0"),
    ([*TRAIN, "--lr", "fast"], "lr", "a finite number > 0", "fast"),
    ([*TRAIN, "--weight-decay", "nan"], "weight-decay", "a finite number >= 0", "nan"),
    ([*TRAIN, "--weight-decay", "-0.5"], "weight-decay", "a finite number >= 0", "-0.5"),
    ([*TRAIN, "--seed", "-1"], "seed", SEED_RULE, "-1"),
    ([*TRAIN, "--seed", "1e20"], "seed", SEED_RULE, "1e20"),
    ([*TRAIN, "--seed", str(2**63)], "seed", SEED_RULE, str(2**63)),
    ([*TRAIN, "--checkpoint-seconds", "nan"], "checkpoint-seconds", "a finite number >= 0", "nan"),
    ([*TRAIN, "--checkpoint-seconds", "-5"], "checkpoint-seconds", "a finite number >= 0", "-5"),
    ([*TRAIN, "--stop-after", "0"], "stop-after", "an integer >= 1", "0"),
    ([*TRAIN, "--iters", "0"], "iters", "an integer >= 1", "0"),
    ([*TRAIN, "--iters", "1.5"], "iters", "an integer >= 1", "1.5"),
    ([*TRAIN, "--batch", "-3"], "batch", "an integer >= 1", "-3"),
    ([*TRAIN, "--eval-every", "0"], "eval-every", "an integer >= 1", "0"),
    ([*TRAIN, "--eval-size", "0"], "eval-size", "an integer >= 1", "0"),
    ([*TRAIN, "--threads", "0"], "threads", "an integer from 1 to 1024", "0"),
    ([*TRAIN, "--threads", "99999999999999999999"], "threads", "an integer from 1 to 1024", "99999999999999999999"),
    ([*TRAIN, "--keep", "nan"], "keep", r"in \(0, 1\]", "nan"),
    (["compare", "--task", "mnist-mlp", "--seeds", "0", "-1", "--out", "x"], "seeds", SEED_RULE, "-1"),
    (["memory", "--batch", "0"], "batch", "an integer >= 1", "0"),
    (["memory", "--threads", "-1"], "threads", "an integer from 1 to 1024", "-1"),
    (["memory", "--keeps", "1", "inf"], "keeps", r"in \(0, 1\]", "inf"),
    (["variance", "--task", "mnist-mlp", "--draws", "1"], "draws", "an integer >= 2", "1"),
    (["variance", "--task", "mnist-mlp", "--warmup", "-1"], "warmup", "an integer >= 0", "-1"),
    (["variance", "--task", "mnist-mlp", "--reference", "0"], "reference", "an integer >= 1", "0"),
    (["variance", "--task", "mnist-mlp", "--seed", "-1"], "seed", SEED_RULE, "-1"),
    (["demo", "--steps", "0"], "steps", "an integer >= 1", "0"),
    (["demo", "--steps", "many"], "steps", "an integer >= 1", "many"),
    (["demo", "--seed", "-1"], "seed", SEED_RULE, "-1"),
    (["demo", "--threads", "0"], "threads", "an integer from 1 to 1024", "0"),
])  # fmt: skip
def test_numeric_options_are_checked_at_parsing(argv: list[str], option: str, rule: str, got: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    name = option.removesuffix("s") if option in ("seeds", "keeps") else option
    expected = (rf"radgrad {argv[0]}: error: argument --{option}: radgrad: {name} must be {rule}, "
                rf"got '{re.escape(got)}'\n$")
    err = capsys.readouterr().err
    assert re.search(expected, err), err


@pytest.mark.parametrize("command", [
    [*TRAIN[:-1]],
    ["compare", "--task", "mnist-mlp", "--out"],
    ["memory", "--out"],
    ["variance", "--task", "mnist-mlp", "--out"],
    ["demo", "--out"],
])  # fmt: skip
def test_out_inside_a_file_is_rejected_at_parsing(command: list[str], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        main([*command, str(blocker / "run")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith(
        f"error: argument --out: radgrad: out must be a folder or a path where one can be created, "
        f"got {str(blocker / 'run')!r} ({blocker} is a file)\n")
    assert blocker.read_text() == "mine"


@pytest.mark.parametrize(("command", "argv", "message"), [
    ("reactor", ["--lr", "nan"], "radgrad: lr must be a finite number > 0, got nan"),
    ("reactor", ["--iters", "0"], "radgrad: iters must be an integer >= 1, got 0"),
    ("reactor", ["--seed", "-1"], f"radgrad: seed must be {SEED_RULE}, got -1"),
    ("reactor", ["--jobs", "0"], "radgrad: jobs must be an integer from 1 to 1024, got 0"),
    ("reactor", ["--keep", "1", "0"], "radgrad: keep must be in (0, 1], got 0.0"),
    ("reactor", ["--keep", "nan"], "radgrad: keep must be in (0, 1], got nan"),
    ("lcg-variance", ["--reps", "1"], "radgrad: reps must be an integer >= 2, got 1"),
    ("lcg-variance", ["--keep", "nan"], r"radgrad: keep must be in (0, 1], got nan"),
    ("lcg-variance", ["--seed", "-1"], f"radgrad: seed must be {SEED_RULE}, got -1"),
    ("lcg-variance", ["--width", "0"], "radgrad: width must be an integer >= 1, got 0"),
])  # fmt: skip
def test_external_commands_check_their_options_before_running(
        command: str, argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, *argv, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == message + "\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [0.5, 1, np.float32(0.25), torch.tensor([0.125], dtype=torch.float64)],
                         ids=["float", "int", "numpy", "tensor"])
def test_check_keep_accepts_what_sketch_config_accepts(value: object) -> None:
    got = options.check_keep(value)
    assert type(got) is float and got == radgrad.SketchConfig(value).keep == float(value)


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.5, math.nan, math.inf, True, "0.5", None, torch.zeros(2)],
                         ids=repr)
def test_check_keep_rejects_what_sketch_config_rejects(value: object) -> None:
    if value is not None:  # SketchConfig takes None for its default; a keep option needs a number
        with pytest.raises((TypeError, ValueError)):
            radgrad.SketchConfig(value)
    with pytest.raises(options.OptionError) as err:
        options.check_keep(value, "keeps")
    assert str(err.value) == f"radgrad: keeps must be in (0, 1], got {value!r}"


def test_external_commands_reject_out_inside_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    for command in ("reactor", "lcg-variance"):
        assert main([command, "--out", str(blocker / "run")]) == 2
        assert capsys.readouterr().err == (f"radgrad: out must be a folder or a path where one can be created, "
                                           f"got {str(blocker / 'run')!r} ({blocker} is a file)\n")


# ---------------------------------------------------------------- failures while running


@pytest.mark.parametrize("content", [b"garbage\n", b""], ids=["garbage", "empty"])
def test_resume_from_a_damaged_checkpoint_cli(content: bytes, tmp_path: Path, tiny_mnist: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / CHECKPOINT).write_bytes(content)
    argv = ["train", *_run_args("mnist-mlp", tiny_mnist, out), "--method", "baseline"]
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"radgrad: cannot read the run file {out / CHECKPOINT} (") and err.count("\n") == 1
    assert err.endswith(f"pass --overwrite to discard the run in {out} and start afresh, or choose another --out\n")
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads((out / RESULT).read_text())["config"]["method"] == "baseline"


def test_diverging_run_exits_with_status_1(tmp_path: Path, tiny_mnist: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["train", *_run_args("mnist-mlp", tiny_mnist, out), "--method", "baseline", "--lr", "1e30"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("radgrad: the run diverged at iteration 2 of 3: the training loss is nan (lr 1e+30, ")
    assert err.endswith(f"try a smaller --lr or --weight-decay; nothing was saved in {out}\n")
    assert list(out.iterdir()) == []


def _run_args(task: str, data: Path, out: Path, *extra: str) -> list[str]:
    small = ["--batch", "2", "--eval-size", "4"] if task == "smnist-irnn" else ["--batch", "6"]
    return ["--task", task, "--iters", "3", "--eval-every", "2", "--data", str(data), "--out", str(out),
            "--no-progress", *small, *extra]


@pytest.mark.parametrize("task", ["mnist-mlp", "smnist-rows", "smnist-irnn", "cifar-cnn"])
def test_train_each_task(task: str, tmp_path: Path, tiny_mnist: Path, request: pytest.FixtureRequest,
                         capsys: pytest.CaptureFixture[str]) -> None:
    source = request.getfixturevalue("tiny_cifar") if task == "cifar-cnn" else tiny_mnist
    out = tmp_path / "run"
    assert main(["train", *_run_args(task, source, out), "--method", "different-sample"]) == 0
    assert f"{task} different-sample seed 0: batch" in capsys.readouterr().out
    result = json.loads((out / RESULT).read_text())
    assert result["config"]["task"] == task and result["config"]["data"] == str(source)
    assert len(result["losses"]) == 3 and all(loss > 0 for loss in result["losses"])
    assert (out / CURVE).read_text().count("\n") == 5 and (out / CHECKPOINT).exists()


def test_train_stop_and_resume_cli(tmp_path: Path, tiny_mnist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", *_run_args("smnist-rows", tiny_mnist, tmp_path / "a"), "--method", "same-sample", "--iters", "6"]
    assert main(args) == 0
    args_b = [a if a != str(tmp_path / "a") else str(tmp_path / "b") for a in args]
    assert main([*args_b, "--stop-after", "3"]) == 0
    assert "radgrad: stopped after 3 of 6 iterations" in capsys.readouterr().err
    assert main([*args_b, "--resume"]) == 0
    a, b = (torch.load(tmp_path / d / CHECKPOINT, weights_only=True) for d in "ab")
    assert a["history"]["losses"] == b["history"]["losses"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_compare(tmp_path: Path, tiny_mnist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", *_run_args("mnist-mlp", tiny_mnist, out), "--methods", "baseline", "reduced-batch",
            "different-sample", "accumulate", "checkpoint", "quantize", "--seeds", "0", "1"]
    assert main(argv) == 0
    md = capsys.readouterr().out
    assert "| method | batch | micro-batch | saved MB | peak MB |" in md and "| different-sample | 6 |" in md
    for name in ("compare.png", "compare.md", "compare.csv"):
        assert (out / name).stat().st_size > 0
    rows = {r["method"]: r for r in csv.DictReader((out / "compare.csv").read_text().splitlines())}
    assert list(rows) == ["baseline", "reduced-batch", "different-sample", "accumulate", "checkpoint", "quantize"]
    assert int(rows["reduced-batch"]["batch"]) < 6 and rows["baseline"]["seeds"] == "2"
    # accumulation: the full batch, in micro-batches of the reduced size, saving what the reduced batch saves
    assert rows["accumulate"]["batch"] == "6" and rows["accumulate"]["micro-batch"] == rows["reduced-batch"]["batch"]
    assert rows["accumulate"]["saved bytes"] == rows["reduced-batch"]["saved bytes"]
    assert rows["checkpoint"]["saved MB"] == "n/a" and float(rows["checkpoint"]["peak MB"]) > 0
    assert float(rows["quantize"]["saved bytes"]) < float(rows["different-sample"]["saved bytes"])
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*-seed*/result.json")}
    assert len(stamps) == 12
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


def test_variance_command(tmp_path: Path, tiny_mnist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["variance", "--task", "mnist-mlp", "--draws", "3", "--reference", "24", "--batch", "6",
            "--methods", "project", "different-sample", "--data", str(tiny_mnist), "--out", str(tmp_path),
            "--no-progress"]
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


def test_external_command_missing_or_broken(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
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


# ---------------------------------------------------------------- the demo


def test_demo_runs_the_training_loop_and_writes_its_outputs(tmp_path: Path, tiny_tensors: Tensors,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(demo, "load_data", lambda task, source=None: tiny_tensors)
    out = tmp_path / "demo"
    assert demo.main(["--steps", "4", "--seed", "3", "--out", str(out), "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["MNIST MLP, 4 iterations, seed 3",
                         "| method | batch | saved for backward | ms/step | final train loss | test accuracy |",
                         "|---|---|---|---|---|---|"]
    assert [line.split(" | ")[0] for line in lines[3:8]] == ["| baseline", "| reduced-batch", "| accumulate",
                                                             "| rad-paper", "| rad-quantize"]
    saved = json.loads((out / "demo.json").read_text())
    assert saved["config"]["seed"] == 3 and saved["config"]["steps"] == 4 and saved["config"]["keep"] == 0.1
    results = saved["results"]
    assert {label: r["config"]["method"] for label, r in results.items()} == demo.RUNS
    assert results["baseline"]["batch"] == 150 and results["reduced-batch"]["batch"] < 150
    assert all(len(r["losses"]) == 4 and r["eval_examples"] == len(tiny_tensors.test_y) for r in results.values())
    rad = RunConfig(demo.TASK, "different-sample", keep=demo.KEEP, iters=4, seed=3, eval_size=len(tiny_tensors.test_y))
    assert train(rad, data=tiny_tensors, progress=False)["losses"] == results["rad-paper"]["losses"]  # the same loop
    rows = list(csv.DictReader((out / "demo.csv").read_text().splitlines()))
    assert [r["method"] for r in rows] == list(demo.RUNS) and rows[0]["batch"] == "150"
    assert "4 iterations, seed 3" in (out / "demo.md").read_text()
    assert (out / "demo.png").read_bytes().startswith(b"\x89PNG")


def test_demo_entry_point_checks_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--steps", "0"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith(
        "radgrad demo: error: argument --steps: radgrad: steps must be an integer >= 1, got '0'\n")


# ---------------------------------------------------------------- without the experiments extra


@pytest.mark.parametrize(("module", "distribution"), list(cli.EXTRA.items()))
def test_missing_extra_is_one_clear_line(module: str, distribution: str, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what an import finds for a module that is not installed
    assert main(["train", "--help"]) == 2
    assert capsys.readouterr() == ("", "radgrad: the command line needs the experiments extra: "
                                       f"pip install 'radgrad[experiments]' (missing: {distribution})\n")


def test_missing_extra_when_the_command_line_is_imported() -> None:
    """A fresh interpreter without tqdm: importing the command line must work, running it says what to install."""
    code = ("import sys\nsys.modules['tqdm'] = None\n"
            "from radgrad.experiments.cli import main\nraise SystemExit(main(['memory']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == ("radgrad: the command line needs the experiments extra: "
                           "pip install 'radgrad[experiments]' (missing: tqdm)\n")


def test_allocate(tmp_path: Path, tiny_mnist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "alloc"
    argv = ["allocate", "--task", "mnist-mlp", "--budget", "0.3", "--batch", "8", "--draws", "3",
            "--data", str(tiny_mnist), "--out", str(out)]
    assert main(argv) == 0
    md = capsys.readouterr().out
    assert "| setting | saved MB | relative variance |" in md and "| allocated |" in md
    result = json.loads((out / "allocate.json").read_text())
    assert set(result["allocation"]) == {"1", "3", "5", "7"}
    assert all(r["saved_bytes"] <= result["budget_bytes"] for r in result["rows"])
    assert (out / "allocate.png").stat().st_size > 0
    with pytest.raises(SystemExit):  # the RNN tasks are not a choice
        main(["allocate", "--task", "smnist-rows", "--out", str(out)])
    assert "invalid choice" in capsys.readouterr().err


def test_plan_end_to_end_on_a_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan"
    assert main(["plan", "--model", "problems:plan_target", "--budget", "0.3", "--rounds", "3", "--draws", "3",
                 "--out", str(out)]) == 0
    md = capsys.readouterr().out
    assert "| candidate | setting | saved MB | peak MB | step / torch | gradient rel. std |" in md
    result = json.loads((out / "plan.json").read_text())
    rows = {r["candidate"]: r for r in result["rows"]}
    assert {"torch (reference)", "accumulate", "checkpoint", "radgrad quantize", "radgrad allocate"} <= set(rows)
    assert all(r["saved_bytes"] <= result["budget_bytes"] for name, r in rows.items()
               if r["saved_bytes"] is not None and name != "torch (reference)")
    assert rows["accumulate"]["relative_std"] == 0 and rows["radgrad quantize"]["relative_std"] > 0
    assert result["recommendation"] in rows and result["recommendation"] != "checkpoint"
    assert f"**Recommended: {result['recommendation']}.**" in md and (out / "plan.csv").exists()


def test_plan_refuses_what_it_cannot_load(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "nowhere"]) == 2
    assert "model must be a task (" in capsys.readouterr().err
    assert main(["plan", "--model", "problems:no_such_factory"]) == 2
    assert "radgrad: cannot load 'problems:no_such_factory'" in capsys.readouterr().err
