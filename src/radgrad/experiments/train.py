"""One training run: the loop, periodic evaluation, checkpoints and exact resumption.

A run lives in one folder (``out``):

* ``checkpoint.pt``: model, optimiser, scheduler, iteration, the history so far
  and every random state the run draws from (torch's default CPU generator,
  from which RAD draws its seeds, and the minibatch sampler's own
  generator). Written atomically every ``checkpoint_seconds`` and at the end.
* ``result.json``: the full config, seed, versions, measured memory, final
  losses and the whole learning curve; written when the run is finished.
* ``curve.csv``: the learning curve (training loss per iteration, test loss
  and accuracy where evaluated).

A run whose training or test loss, or whose parameters, become NaN or
infinite stops with :class:`RunDiverged` and writes nothing more: the folder
keeps its last checkpoint, taken before the divergence, and no result.

NOTE [Exact resumption]
    A run resumed from a checkpoint makes the very same floating-point
    operations, in the same order, with the same random draws as an
    uninterrupted one, so it ends bitwise identical: the model is rebuilt
    from the seed (same initial draws), then parameters, optimiser and
    scheduler state and both generators are overwritten from the
    checkpoint. Measurements (memory, reduced batch) run under
    ``torch.random.fork_rng`` and evaluation draws nothing, so neither shifts
    a random stream. Python's ``random`` and numpy's global generator are not
    used. Results may differ bitwise between thread counts, so the number of
    torch threads is part of the config.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import radgrad
from radgrad.experiments import budget, options, report
from radgrad.experiments.data import Tensors
from radgrad.experiments.steps import Stepper
from radgrad.experiments.tasks import Task, get_method, get_task, load_data

__all__ = ["RunConfig", "RunStopped", "RunDiverged", "train", "fit", "evaluate", "load_result", "write_atomic",
           "CHECKPOINT", "RESULT", "CURVE"]

CHECKPOINT, RESULT, CURVE = "checkpoint.pt", "result.json", "curve.csv"
_EVAL_CHUNK = 1000


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's numbers.

    ``None`` fields take the task's and method's defaults in :meth:`resolved`.

    Attributes:
        task, method: names in :data:`~radgrad.experiments.tasks.TASKS` and
            :data:`~radgrad.experiments.tasks.METHODS`.
        keep: RAD's keep fraction (for ``reduced-batch``: the RAD memory to match).
        iters: optimiser steps (default: the paper's count for the task).
        seed: seeds the initial weights, the minibatches and RAD's samples.
        batch: the full batch (default 150); ``reduced-batch`` computes its own from it.
        lr, weight_decay: default: the paper's values for the task and method.
        eval_every: iterations between evaluations (default: iters / 20).
        eval_size: examples of the fixed test subset (default: per task).
        threads: torch CPU threads.
        data: dataset file or folder (default: the task loader's default).
    """

    task: str
    method: str
    keep: float = 0.1
    iters: int | None = None
    seed: int = 0
    batch: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    eval_every: int | None = None
    eval_size: int | None = None
    threads: int = 1
    data: str | None = None

    def resolved(self) -> RunConfig:
        """A copy with every default filled in, after checking every value.

        Raises:
            ValueError: an unknown task or method, or a value out of range
                (:class:`~radgrad.experiments.options.OptionError`, naming the field).
        """
        task, method = get_task(self.task), get_method(self.method)
        options.check_keep(self.keep)
        options.check_seed(self.seed)
        lr, wd = task.lr_wd(method.name)
        iters = task.paper_iters if self.iters is None else self.iters
        filled = dataclasses.replace(
            self, keep=float(self.keep), iters=iters,
            batch=task.batch if self.batch is None else self.batch,
            lr=lr if self.lr is None else self.lr,
            weight_decay=wd if self.weight_decay is None else self.weight_decay,
            eval_every=max(1, iters // 20) if self.eval_every is None else self.eval_every,
            eval_size=task.eval_size if self.eval_size is None else self.eval_size,
            data=None if self.data is None else str(self.data),
        )  # fmt: skip
        for name in ("iters", "batch", "eval_every", "eval_size"):
            options.check_int(name.replace("_", "-"), getattr(filled, name))
        options.check_int("threads", filled.threads, 1, options.WORKERS_MAX)
        options.check_number("lr", filled.lr)
        options.check_number("weight-decay", filled.weight_decay, closed=True)
        return filled


class RunStopped(Exception):
    """Raised by :func:`train` when ``stop_after`` ends a run early (after a checkpoint)."""


class RunDiverged(RuntimeError):
    """Raised by :func:`train` and :func:`fit` when the loss or the parameters stop being finite.

    Nothing is written after the divergence: a run folder keeps its last
    checkpoint (if any), which holds the run before it diverged, and no result.
    """


@dataclass
class _History:
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)  # wall-clock time of each step


@dataclass
class _Run:
    """The live state of a run."""

    config: RunConfig
    task: Task
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    sampler: torch.Generator
    batch: int
    saved_bytes: int | None
    peak_bytes: int
    stepper: Stepper
    checkpoint_fits: bool | None = None
    allocation: dict[str, str] | None = None  # layer -> its allocated sketch setting
    history: _History = field(default_factory=_History)
    saved_iteration: int | None = None  # iteration held by the checkpoint on disk, if any

    @property
    def iteration(self) -> int:
        return len(self.history.losses)

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds (see NOTE [Exact resumption])."""
        return {
            "config": dataclasses.asdict(self.config),
            "iteration": self.iteration,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "sampler_rng": self.sampler.get_state(),
            "history": dataclasses.asdict(self.history),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.sampler.set_state(state["sampler_rng"])
        self.history = _History(**state["history"])


def sampler_seed(seed: int) -> int:
    """Seed of the minibatch sampler: derived from ``seed`` but a different stream from RAD's."""
    return int(np.random.SeedSequence([seed, 1]).generate_state(1, np.uint64)[0] >> 1)


def _calibration(data: Tensors, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of training examples for calibrating an allocation, drawn from ``seed`` (not the sampler's stream)."""
    idx = torch.randint(len(data.train_y), (batch,), generator=torch.Generator().manual_seed(seed))
    return data.train_x[idx], data.train_y[idx]


def _build(config: RunConfig, data: Tensors) -> _Run:
    """A fresh run: seeded initial weights, batch, converted model, optimiser, scheduler."""
    task, method = get_task(config.task), get_method(config.method)
    torch.manual_seed(config.seed)
    model = task.model()
    batch = budget.reduced_batch(model, task, config.keep, config.batch) if method.reduced else config.batch
    stepper, fits = Stepper(), None
    if method.accumulate:
        stepper = Stepper(micro=budget.reduced_batch(model, task, config.keep, config.batch))
    elif method.checkpoint:
        segments, fits = budget.checkpoint_segments(model, task, config.keep, config.batch)
        stepper = Stepper(segments=segments)
    budget.prepare(model, method, config.keep).train()
    allocation = None
    if method.allocate:
        choice = budget.allocate(model, task, config.keep, *_calibration(data, batch, config.seed))
        allocation = {name: repr(c) for name, c in choice.configs.items()}
    # what one pass saves for backward: a micro-batch's when accumulating; the ruler
    # cannot see through checkpointing's own saved-tensor hooks, so none is reported there
    saved = None if method.checkpoint else budget.saved_bytes(model, task, stepper.micro or batch)
    peak = budget.peak_bytes(model, task, batch, stepper)
    opt_type = torch.optim.Adam if task.optimizer == "adam" else torch.optim.SGD
    optimizer = opt_type(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = None
    if task.decay is not None:
        step = max(1, config.iters // task.decays)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step, gamma=task.decay)
    sampler = torch.Generator().manual_seed(sampler_seed(config.seed))
    return _Run(config, task, model, optimizer, scheduler, sampler, batch, saved, peak, stepper, fits, allocation)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (in eval mode) on ``(x, y)``."""
    was_training = model.training
    model.eval()
    total, correct = 0.0, 0
    for lo in range(0, len(y), _EVAL_CHUNK):
        logits = model(x[lo:lo + _EVAL_CHUNK])
        total += nn.functional.cross_entropy(logits, y[lo:lo + _EVAL_CHUNK], reduction="sum").item()
        correct += int((logits.argmax(1) == y[lo:lo + _EVAL_CHUNK]).sum())
    model.train(was_training)
    return total / len(y), correct / len(y)


def _eval_subset(data: Tensors, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed test subset (the same for every run and seed): the whole set if it is small."""
    n = len(data.test_y)
    if size >= n:
        return data.test_x, data.test_y
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:size].sort().values
    return data.test_x[idx], data.test_y[idx]


def write_atomic(path: Path, payload: bytes | str) -> None:
    """Write ``payload`` to ``path`` so that a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(payload.encode() if isinstance(payload, str) else payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_checkpoint(run: _Run, out: Path) -> None:
    """Write the run's state, unless its parameters went non-finite (then :class:`RunDiverged`)."""
    if not all(bool(torch.isfinite(p).all()) for p in run.model.parameters()):
        raise _diverged(run, out, run.iteration, "the parameters are not finite")
    buffer = io.BytesIO()
    torch.save(run.state(), buffer)
    write_atomic(out / CHECKPOINT, buffer.getvalue())
    run.saved_iteration = run.iteration


def _diverged(run: _Run, folder: Path | None, iteration: int, what: str) -> RunDiverged:
    config = run.config
    if folder is None:
        kept = ""
    elif run.saved_iteration is None:
        kept = f"; nothing was saved in {folder}"
    else:
        kept = (f"; {folder / CHECKPOINT} holds iteration {run.saved_iteration}, before the divergence "
                "(pass --overwrite to start afresh)")
    return RunDiverged(f"radgrad: the run diverged at iteration {iteration} of {config.iters}: {what} "
                       f"(lr {config.lr:g}, weight-decay {config.weight_decay:g}); "
                       f"try a smaller --lr or --weight-decay{kept}")


def load_result(out: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The finished run's ``result.json`` in ``out``, or None if there is none.

    Raises:
        ValueError: the file is damaged or is not a result written by :func:`train`.
    """
    path = Path(out) / RESULT
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _unreadable(path, err) from None
    if not (isinstance(result, dict) and isinstance(result.get("config"), dict) and "final_train_loss" in result):
        raise _unreadable(path, "not a radgrad result")
    return result


_CHECKPOINT_KEYS = frozenset({"config", "iteration", "model", "optimizer", "scheduler", "torch_rng",
                              "sampler_rng", "history"})


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """The state saved in ``path`` by :func:`_save_checkpoint`; ValueError naming the file if unreadable."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # a damaged file fails in many ways: EOFError, RuntimeError, UnpicklingError...
        raise _unreadable(path, err) from None
    if not (isinstance(state, dict) and _CHECKPOINT_KEYS <= state.keys() and isinstance(state["config"], dict)):
        raise _unreadable(path, "not a radgrad checkpoint")
    return state


def _unreadable(path: Path, why: Exception | str) -> ValueError:
    if isinstance(why, Exception):
        first_line = (str(why).strip().splitlines() or [""])[0][:120]
        why = f"{type(why).__name__}: {first_line}" if first_line else type(why).__name__
    return ValueError(f"radgrad: cannot read the run file {path} ({why}): it is damaged or was not written by "
                      f"radgrad; pass --overwrite to discard the run in {path.parent} and start afresh, "
                      "or choose another --out")


def _check_same_config(stored: dict[str, Any], config: RunConfig, where: Path) -> None:
    mine = dataclasses.asdict(config)
    diff = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
    if diff:
        pairs = ", ".join(f"{k}: {stored.get(k)!r} there, {mine.get(k)!r} now" for k in diff)
        raise ValueError(f"radgrad: {where} holds a run with another config ({pairs}); "
                         "use the same options or another --out")


def train(
    config: RunConfig,
    out: str | os.PathLike[str] | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    checkpoint_seconds: float = 120.0,
    data: Tensors | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one model with one method; return (and, given ``out``, save) its result.

    Args:
        config: the run (defaults are filled in with :meth:`RunConfig.resolved`).
        out: the run's folder; None keeps nothing on disk (no checkpoints).
        resume: continue from ``out/checkpoint.pt`` if present (a finished run
            is returned as it is, without training); start afresh otherwise.
        overwrite: discard a run already in ``out``.
        stop_after: stop after this many iterations (an integer >= 1), right after
            writing a checkpoint, and raise :class:`RunStopped` (simulates a kill; for tests).
        checkpoint_seconds: wall-clock seconds between checkpoints, finite and >= 0
            (0: every iteration).
        data: in-memory data to use instead of loading ``config.data``.
        progress: show a tqdm progress bar on stderr.

    Returns:
        The result dict written to ``result.json``.

    Side effect: sets torch's CPU thread count to ``config.threads``.

    Raises:
        ValueError: a bad config or option, ``out`` is not a folder, already
            holds a run (without ``resume``/``overwrite``) or one with another
            config, or holds a run file that cannot be read.
        RunStopped: ``stop_after`` was reached before the end.
        RunDiverged: the training or test loss, or the parameters, became NaN
            or infinite (the message names the iteration and what was kept).
    """
    config = config.resolved()
    if stop_after is not None:
        options.check_int("stop-after", stop_after)
    options.check_number("checkpoint-seconds", checkpoint_seconds, closed=True)
    torch.set_num_threads(config.threads)
    folder = None if out is None else Path(out)
    state = _existing_state(folder, config, resume, overwrite)
    if isinstance(state, dict) and "final_train_loss" in state:
        return state
    data = load_data(get_task(config.task), config.data) if data is None else data
    run = _build(config, data)
    if state is not None:
        try:
            run.restore(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:  # well-formed, but not this run's shapes
            raise _unreadable(folder / CHECKPOINT, err) from None  # type: ignore[operator]
        run.saved_iteration = run.iteration
    _loop(run, data, folder, stop_after, checkpoint_seconds, progress)
    result = _result(run, min(config.eval_size, len(data.test_y)))
    if folder is not None:
        write_atomic(folder / RESULT, json.dumps(result, indent=1))
        write_atomic(folder / CURVE, _curve_csv(run.history))
    return result


def fit(config: RunConfig, data: Tensors, progress: bool = True) -> nn.Module:
    """Train in memory (nothing written) and return the trained model, in training mode.

    Raises:
        ValueError: a bad config.
        RunDiverged: the loss or the parameters stopped being finite.
    """
    config = config.resolved()
    torch.set_num_threads(config.threads)
    run = _build(config, data)
    _loop(run, data, None, None, 0.0, progress)
    return run.model


def _existing_state(folder: Path | None, config: RunConfig, resume: bool, overwrite: bool) -> dict | None:
    """A finished result, a checkpoint's state to resume from, or None to start afresh."""
    if folder is None:
        return None
    options.make_folder(folder)
    ckpt = folder / CHECKPOINT
    if overwrite:
        for name in (CHECKPOINT, RESULT, CURVE):
            (folder / name).unlink(missing_ok=True)
        return None
    if not resume:
        if ckpt.exists() or (folder / RESULT).exists():
            raise ValueError(f"radgrad: {folder} already holds a run; pass --resume to continue it, "
                             "--overwrite to discard it, or another --out")
        return None
    finished = load_result(folder)
    if finished is not None:
        _check_same_config(finished["config"], config, folder)
        return finished
    if not ckpt.exists():
        return None
    state = _load_checkpoint(ckpt)
    _check_same_config(state["config"], config, folder)
    return state


def _loop(run: _Run, data: Tensors, folder: Path | None, stop_after: int | None,
          checkpoint_seconds: float, progress: bool) -> None:
    config, task, history = run.config, run.task, run.history
    test_x, test_y = _eval_subset(data, config.eval_size)
    train_x, train_y = data.train_x, data.train_y
    if run.iteration == 0:
        history.evals.append(_eval_row(run.model, 0, test_x, test_y))
    last_save = time.monotonic()
    bar = tqdm(total=config.iters, initial=run.iteration, desc=f"{config.task} {config.method} s{config.seed}",
               file=sys.stderr, disable=not progress, dynamic_ncols=True, mininterval=0.5)
    with bar:
        while run.iteration < config.iters:
            start = time.perf_counter()
            idx = torch.randint(len(train_y), (run.batch,), generator=run.sampler)
            run.optimizer.zero_grad(set_to_none=True)
            value = run.stepper.backward(run.model, train_x[idx], train_y[idx]).item()
            if not math.isfinite(value):
                raise _diverged(run, folder, run.iteration + 1, f"the training loss is {value}")
            if task.clip is not None:
                nn.utils.clip_grad_norm_(run.model.parameters(), task.clip)
            try:
                run.optimizer.step()
            except RuntimeError as err:
                # torch cannot turn a huge lr or weight decay into the parameters' float type
                if "overflow" not in str(err):
                    raise
                raise _diverged(run, folder, run.iteration + 1, "the optimizer step overflowed") from None
            if run.scheduler is not None:
                run.scheduler.step()
            history.losses.append(value)
            history.step_seconds.append(time.perf_counter() - start)
            history.seconds += history.step_seconds[-1]
            it = run.iteration
            if it % config.eval_every == 0 or it == config.iters:
                row = _eval_row(run.model, it, test_x, test_y)
                if not math.isfinite(row["test_loss"]):
                    raise _diverged(run, folder, it, f"the test loss is {row['test_loss']}")
                history.evals.append(row)
                bar.set_postfix(loss=f"{history.losses[-1]:.4f}", test_acc=f"{history.evals[-1]['test_accuracy']:.3f}",
                                refresh=False)
            elif it % 10 == 0:
                bar.set_postfix(loss=f"{history.losses[-1]:.4f}", refresh=False)
            bar.update()
            stop = stop_after is not None and it >= stop_after and it < config.iters
            if folder is not None and (stop or time.monotonic() - last_save >= checkpoint_seconds):
                _save_checkpoint(run, folder)
                last_save = time.monotonic()
            if stop:
                raise RunStopped(f"radgrad: stopped after {it} of {config.iters} iterations "
                                 f"(checkpoint in {folder}); continue with --resume")
    if folder is not None:
        _save_checkpoint(run, folder)


def _eval_row(model: nn.Module, iteration: int, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    test_loss, test_accuracy = evaluate(model, x, y)
    return {"iteration": iteration, "test_loss": test_loss, "test_accuracy": test_accuracy}


def _result(run: _Run, eval_examples: int) -> dict[str, Any]:
    config, history = run.config, run.history
    tail = history.losses[-max(1, config.iters // 20):]
    last = history.evals[-1]
    return {
        "config": dataclasses.asdict(config),
        "seed": config.seed,
        "radgrad_version": radgrad.__version__,
        "torch_version": torch.__version__,
        "method": dataclasses.asdict(get_method(config.method)),
        "optimizer": run.task.optimizer,
        "lr_decay": None if run.task.decay is None else {"factor": run.task.decay, "every": max(1, config.iters // run.task.decays)},
        "clip": run.task.clip,
        "batch": run.batch,
        "micro_batch": run.stepper.micro,
        "checkpoint_segments": run.stepper.segments,
        "checkpoint_fits_rad_peak": run.checkpoint_fits,
        "allocation": run.allocation,
        "saved_bytes": run.saved_bytes,
        "peak_bytes": run.peak_bytes,
        "param_bytes": budget.param_bytes(run.model),
        "final_train_loss": sum(tail) / len(tail),
        "final_train_loss_window": len(tail),
        "final_test_loss": last["test_loss"],
        "final_test_accuracy": last["test_accuracy"],
        "eval_examples": eval_examples,
        "train_seconds": history.seconds,  # training steps only, evaluation excluded
        "iters_per_second": len(history.losses) / history.seconds if history.seconds else None,
        "losses": history.losses,
        "step_seconds": history.step_seconds,
        "evals": history.evals,
    }


def _curve_csv(history: _History) -> str:
    evals = {row["iteration"]: row for row in history.evals}
    rows = [{"iteration": it, "train_loss": history.losses[it - 1] if it else "",
             "test_loss": evals.get(it, {}).get("test_loss", ""),
             "test_accuracy": evals.get(it, {}).get("test_accuracy", "")}
            for it in range(len(history.losses) + 1)]
    return report.csv_text(rows)
