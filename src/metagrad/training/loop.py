"""Meta-training: one explicit outer loop. Sample tasks, meta-gradient, optimiser step, log,
evaluate, checkpoint.

Run it from the command line (``metagrad`` is ``python -m metagrad``)::

    metagrad train                                    # MAML on sinusoid (the quickstart preset)
    metagrad train --preset omniglot-5w1s-maml --data PATH --out runs/x
    metagrad train --preset omniglot-20w1s-maml --steps 2000 --inner-steps 5 --out runs/y
    metagrad train --resume runs/x                    # continue where it stopped, bit for bit
    metagrad eval runs/x --tasks 600

or from Python: ``train(preset("sinusoid-maml").override(steps=500), "runs/z")``. Under
``torchrun`` the command line passes the reducer of :mod:`metagrad.training.distributed`; the
loop is the same (see :mod:`metagrad.training.reduce`).

Determinism: the tasks of step ``t`` come from a ``torch.Generator`` seeded with
:func:`task_seed` ``(seed, t)``, evaluation tasks from a fixed separate seed, the initialisation
from ``seed``; with deterministic kernels (the default on CPU) a resumed run ends with the same
parameters, bit for bit, as one that was never stopped.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metagrad._types import Metrics, Params
from metagrad.algorithms import ALGORITHMS
from metagrad.data import TaskSource
from metagrad.tasks import count, to_device
from metagrad.training.build import build_estimator, build_model, data_root, task_source
from metagrad.training.checkpoint import (
    CHECKPOINT,
    PREVIOUS,
    RESUMABLE,
    UNCHECKED,
    CorruptCheckpointError,
    check_identity,
    identity,
    load_checkpoint,
    remove_stale_temps,
    save_checkpoint,
    set_rng_state,
)
from metagrad.training.config import Config, OptimConfig, field_section
from metagrad.training.evaluate import Evaluation, evaluate
from metagrad.training.plots import plot_curves, plot_sinusoid
from metagrad.training.progress import Progress
from metagrad.training.reduce import Local, Reducer
from metagrad.training.run import RunDir, StopOnSignal, check_device, load_params, torch_settings

__all__ = ["RESUMABLE", "TrainResult", "TrainingError", "resume", "task_seed", "train"]


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite meta-loss); the last good checkpoint is kept."""


def task_seed(seed: int, step: int) -> int:
    """The seed of the tasks of outer step ``step``: reproduce them with ``manual_seed(...)``."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class TrainResult:
    """What :func:`train` returns: where the run is, how far it got, its final evaluation."""

    path: Path
    step: int
    params: Params
    interrupted: bool = False
    signal: str | None = None  # what interrupted it: "SIGINT", "SIGTERM" (None: another rank)
    evaluation: Evaluation | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)


def _optimizer(config: Config, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    o = config.optim
    if o.optimizer == "adam":
        return torch.optim.Adam(params, lr=o.outer_lr, eps=o.adam_eps)
    return torch.optim.SGD(params, lr=o.outer_lr)


def _lr(config: Config, step: int) -> float:
    o = config.optim
    return o.outer_lr * (1 - step / o.steps if o.schedule == "linear" else 1.0)


def _scalars(metrics: Metrics) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in metrics.items() if v.dim() == 0}
    inner = metrics.get("inner_losses")
    if inner is not None and inner.numel() > 0:
        out["support_loss"] = inner[0]  # before adaptation
    return out


def check_config(config: Config) -> None:
    """``ValueError`` for a config that builds but cannot train (checked before any folder is
    made): ``head`` prefixes that match no meta-parameter, for an algorithm that reads them;
    ``inner_carry`` for an algorithm that does not read it, or with a solver that has no state;
    ``adam_eps`` changed for the sgd outer optimiser."""
    entry = ALGORITHMS[config.algo.algorithm]
    if config.optim.optimizer != "adam" and config.optim.adam_eps != OptimConfig().adam_eps:
        raise ValueError(
            f"--adam-eps is read by the adam outer optimiser only, not by "
            f"{config.optim.optimizer}: drop it or pass --optimizer adam"
        )
    if config.algo.inner_carry and "inner_carry" not in entry.options.values():
        readers = [e.name for e in ALGORITHMS.entries() if "inner_carry" in e.options.values()]
        raise ValueError(
            f"--inner-carry is read by {', '.join(readers)} only, not by "
            f"{config.algo.algorithm}: drop it"
        )
    if config.algo.inner_carry:
        build_estimator(config, build_model(config))  # the estimator checks its solver
    if "head" in entry.options.values():
        model = build_model(config)
        names = list(build_estimator(config, model).init_meta(model))
        if not any(n.startswith(tuple(config.algo.head)) for n in names):
            heads = sorted({n.rsplit(".", 1)[0] + "." for n in names})
            raise ValueError(
                f"--head {' '.join(config.algo.head)} matches no parameter of {config.model.arch}"
                f" (its parameters start with {', '.join(heads)}): pass one of those prefixes, "
                f"e.g. --head {heads[-1]}"
            )


def train(
    config: Config,
    out: str | Path,
    *,
    progress: bool | None = None,
    reducer: Reducer | None = None,
) -> TrainResult:
    """Meta-train ``config`` in a new run folder ``out``; evaluate on the test split at the end.

    ``progress``: a bar (None: when stderr is a terminal), else log lines. ``reducer``: where
    the meta-gradients and evaluation scores are computed (default :class:`~.reduce.Local`);
    one whose ``is_main`` is false (a distributed rank other than 0) writes nothing.
    Raises ``ValueError`` for a folder that holds a run or other files, and
    :class:`TrainingError` for a non-finite meta-loss, naming the step and its tasks' seed.
    """
    reducer = reducer or Local()
    check_device(config)
    config = data_root(config)
    check_config(config)
    source = task_source(config.data)
    run = RunDir.create(out, config, source.split_info, is_main=reducer.is_main)
    return _train(config, run, source, None, progress, reducer)


@dataclass(frozen=True)
class _Resume:
    previous: bool  # from checkpoint.prev.pt
    changed: bool  # config.json is rewritten once every check has passed


def resume(
    out: str | Path,
    *,
    progress: bool | None = None,
    reducer: Reducer | None = None,
    previous: bool = False,
    **changes: Any,
) -> TrainResult:
    """Continue the run in ``out`` from its last checkpoint; ``changes``: only :data:`RESUMABLE`
    and the data folder ``root`` (data that moved).

    With deterministic kernels the result is bit-identical to a run that never stopped. The
    checkpoint must belong to ``config.json`` (``ValueError`` naming the differing setting, and
    nothing in the folder written); ``previous=True`` continues from ``checkpoint.prev.pt``
    instead (the current checkpoint is then moved aside).
    """
    reducer = reducer or Local()
    run, config = RunDir.open(out, is_main=reducer.is_main)
    fixed = sorted(k for k, v in changes.items() if k not in UNCHECKED and v != _get(config, k))
    if fixed:
        raise ValueError(
            f"{', '.join(fixed)} cannot change when resuming (it would change the run's results; "
            f"only {', '.join(RESUMABLE)} and the data folder can): start a new run with --out"
        )
    if changes:
        config = config.override(**changes)
    check_device(config)
    source = task_source(config.data)
    return _train(config, run, source, _Resume(previous, bool(changes)), progress, reducer)


def _get(config: Config, name: str) -> Any:
    return getattr(getattr(config, field_section(name)), name)


def _train(
    config: Config,
    run: RunDir,
    source: TaskSource,
    resumed: _Resume | None,
    progress: bool | None,
    reducer: Reducer,
) -> TrainResult:
    try:
        with torch_settings(config):
            return _loop(config, run, source, resumed, progress, reducer)
    finally:
        run.close()


def _loop(
    config: Config,
    run: RunDir,
    source: TaskSource,
    resumed: _Resume | None,
    progress: bool | None,
    reducer: Reducer,
) -> TrainResult:
    device = torch.device(config.run.device)
    seed = config.run.seed
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    model = build_model(config).to(device)
    estimator = build_estimator(config, model)
    evaluator = build_estimator(config, model, evaluation=True)
    theta = estimator.init_meta(model)
    carried = {k for k in theta if k.startswith(getattr(estimator, "carried_prefixes", ()))}
    learned = {k: p for k, p in theta.items() if k not in carried}
    optimizer = _optimizer(config, list(learned.values()))
    generator = torch.Generator()
    generators = {"tasks": generator}
    step = 0
    if resumed is not None:  # every check before anything in the folder is written
        step = _restore(run, config, theta, optimizer, generators, resumed.previous)
        if config.optim.steps < step:
            raise ValueError(
                f"--steps {config.optim.steps} is below the step of the checkpoint in {run.path} "
                f"({step}): pass --steps {step} or more"
            )
    start = step
    run.start_logs(step, config.run.tensorboard)  # reads the log first: a bad line stops here
    if resumed is not None and resumed.previous and run.is_main:
        current = run.path / CHECKPOINT  # continued from the one before: keep it, out of the way
        if current.is_file():
            os.replace(current, _aside(current))
    if resumed is not None and resumed.changed:
        run.update_config(config)
    if reducer.is_main:
        remove_stale_temps(run.path)
    belongs_to = identity(config, theta)

    saved_at = start if resumed is not None else None

    def checkpoint() -> None:
        nonlocal saved_at
        saved_at = step
        if not all(bool(p.isfinite().all()) for p in theta.values()):
            raise TrainingError(f"non-finite parameters at step {step}: checkpoint not written")
        if reducer.is_main:
            save_checkpoint(
                run.path,
                step=step,
                params=theta,
                optimizer=optimizer,
                generators=generators,
                belongs_to=belongs_to,
            )

    stop = StopOnSignal()
    stopping = False
    bar = Progress(config.optim.steps, step, enabled=progress)
    window: dict[str, torch.Tensor] = {}
    window_start, window_steps = time.perf_counter(), 0
    try:
        with stop:
            while step < config.optim.steps and not stopping:
                for group in optimizer.param_groups:
                    group["lr"] = _lr(config, step)
                seed_t = task_seed(seed, step)
                tasks = source.sample(
                    "train", config.optim.meta_batch, generator.manual_seed(seed_t)
                )
                tasks = to_device(tasks, device)
                try:
                    grads, metrics = reducer.meta_gradient(
                        estimator, theta, tasks, config.algo.mode
                    )
                except ValueError as e:
                    raise _diverged(run, step, seed_t, str(e)) from e
                scalars = _scalars(metrics)
                finite = torch.stack([g.isfinite().all() for g in grads.values()]).all()
                if not bool(finite & scalars["query_loss"].isfinite()):  # one sync per step
                    loss = scalars["query_loss"].item()
                    raise _diverged(run, step, seed_t, f"query loss {loss} or its gradient")
                for k, p in learned.items():
                    p.grad = grads[k]
                optimizer.step()
                if carried:  # the inner solver's state, carried to the next meta-batch
                    with torch.no_grad():
                        carry = estimator.carry  # type: ignore[attr-defined]
                        for k, v in carry(theta, grads, count(tasks)).items():
                            theta[k].copy_(v)
                step += 1
                for k, v in scalars.items():
                    window[k] = window.get(k, 0) + v
                window_steps += 1
                if step % config.run.log_every == 0 or step == config.optim.steps:
                    now = time.perf_counter()
                    values = {k: float(v) / window_steps for k, v in window.items()}
                    values["steps_per_s"] = window_steps / max(now - window_start, 1e-9)
                    values["lr"] = optimizer.param_groups[0]["lr"]
                    run.log(step, values)
                    bar.log(step, values)
                    window, window_start, window_steps = {}, now, 0
                if config.run.eval_every and step % config.run.eval_every == 0:
                    n = config.run.val_tasks
                    ev = _evaluate(config, evaluator, theta, source, "val", n, reducer)
                    run.log(step, ev.scalars(), prefix="val_")
                    bar.write(f"step {step}: validation {ev.summary()}")
                bar.update(step)
                stopping = reducer.any_stop(stop.requested)  # every rank stops at the same step
                if step % config.run.checkpoint_every == 0 or stopping:
                    checkpoint()
            if step == config.optim.steps and not stopping and saved_at != step:
                checkpoint()
    finally:
        bar.close()
    result = TrainResult(run.path, step, theta, interrupted=stopping, history=run.metrics())
    result.signal = stop.signal
    if not stopping:
        n = config.run.eval_tasks
        ev = _evaluate(config, evaluator, theta, source, "test", n, reducer)
        logged = any(k.startswith("test_") for r in result.history if r["step"] == step for k in r)
        if not logged:  # a finished run resumed again: its test line is there already
            run.log(step, ev.scalars(), prefix="test_")
            run.write_json("eval_test.json", ev.to_dict())
        result.evaluation = ev
        if reducer.is_main and config.data.benchmark == "sinusoid":
            shots = config.data.eval_shots or config.data.shots
            seed = config.run.eval_seed
            result.plots.append(
                plot_sinusoid(evaluator, theta, run.path / "adapted.png", seed, shots)
            )
    if reducer.is_main and run.metrics():
        plot_curves(run.metrics(), run.path / "curves.png")
        result.plots.insert(0, run.path / "curves.png")
    return result


def _evaluate(
    config: Config,
    est: Any,
    theta: Params,
    source: TaskSource,
    split: str,
    n: int,
    reducer: Reducer,
) -> Evaluation:
    seed, mode = config.run.eval_seed, config.algo.mode
    return evaluate(est, theta, source, split, n, seed, mode, reducer)


def _restore(
    run: RunDir,
    config: Config,
    theta: Params,
    optimizer: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
    previous: bool,
) -> int:
    """Load the run's checkpoint into ``theta``, ``optimizer`` and ``generators``; its step.

    Nothing is written: the checkpoint reads, belongs to ``config`` and holds a whole run state,
    or this raises ``ValueError``.
    """
    name = PREVIOUS if previous else CHECKPOINT
    path = run.path / name
    if not path.is_file():
        if previous:
            raise ValueError(f"{run.path} holds no previous checkpoint {PREVIOUS}")
        return 0  # stopped before its first checkpoint: start again
    state = load_checkpoint(run.path, name=name)  # on the CPU: random states must stay there
    check_identity(state, config, theta, path)
    try:
        load_params(theta, state["params"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], generators)
        step = int(state["step"])
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
        raise CorruptCheckpointError(
            f"{path} does not hold a whole run state ({type(e).__name__}: {str(e)[:60]}): "
            "restore it from a copy, or start a new run with --out"
        ) from None
    return step


def _aside(path: Path) -> Path:
    target, n = path.with_name(path.name + ".set-aside"), 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.set-aside.{n}")
    return target


def _diverged(run: RunDir, step: int, seed: int, what: str) -> TrainingError:
    ckpt = run.path / CHECKPOINT
    try:
        kept = (
            f"the last good checkpoint (step {load_checkpoint(run.path)['step']}) is kept in {ckpt}"
            if ckpt.is_file()
            else "no checkpoint had been written yet"
        )
    except CorruptCheckpointError:
        kept = f"{ckpt} cannot be read"
    return TrainingError(
        f"non-finite meta-loss at step {step}, tasks drawn with "
        f"torch.Generator().manual_seed({seed}) ({what.split(':')[0]}); {kept}"
    )
