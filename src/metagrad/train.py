"""Meta-training: one explicit outer loop. Sample tasks, meta-gradient, optimiser step, log,
evaluate, checkpoint.

Run it from the command line (``metagrad`` is ``python -m metagrad``)::

    metagrad train                                    # MAML on sinusoid, about a minute on 2 cores
    metagrad train --preset omniglot-5w1s-maml --data PATH --out runs/x
    metagrad train --preset omniglot-20w1s-maml --steps 2000 --inner-steps 5 --out runs/y
    metagrad train --resume runs/x                    # continue where it stopped, bit for bit
    metagrad eval runs/x --tasks 600

or from Python: ``train(preset("sinusoid-maml").override(steps=500), "runs/z")``.

Determinism: the tasks of step ``t`` come from a ``torch.Generator`` seeded with
:func:`task_seed` ``(seed, t)``, evaluation tasks from a fixed separate seed, the initialisation
from ``seed``; with deterministic kernels (the default on CPU) a resumed run ends with the same
parameters, bit for bit, as one that was never stopped.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import metagrad as mg
from metagrad._build import TaskSource, build_estimator, build_model, data_root
from metagrad._types import Metrics, Params, Task
from metagrad.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint, set_rng_state
from metagrad.config import Config
from metagrad.evaluate import Evaluation, evaluate, plot_sinusoid
from metagrad.run import Progress, RunDir, StopOnSigint, check_device, torch_settings

__all__ = [
    "RESUMABLE",
    "TrainResult",
    "TrainingError",
    "outer_gradient",
    "resume",
    "task_seed",
    "train",
]


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite meta-loss); the last good checkpoint is kept."""


def task_seed(seed: int, step: int) -> int:
    """The seed of the tasks of outer step ``step``: reproduce them with ``manual_seed(...)``."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0] >> 1)


def outer_gradient(estimator: Any, theta: Params, tasks: Task, mode: str) -> tuple[Params, Metrics]:
    """The meta-gradient and metrics averaged over the global meta-batch ``tasks``.

    The one place that sees the whole meta-batch: a distributed version takes its rank's share
    of the tasks here and all-reduces the flattened gradient and the metrics.
    """
    return mg.meta_gradient(estimator, theta, tasks, mode=mode)  # type: ignore[arg-type]


@dataclass
class TrainResult:
    """What :func:`train` returns: where the run is, how far it got, its final evaluation."""

    path: Path
    step: int
    params: Params
    interrupted: bool = False
    evaluation: Evaluation | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)


def _optimizer(config: Config, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    o = config.optim
    if o.optimizer == "adam":
        return torch.optim.Adam(params, lr=o.outer_lr)
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


RESUMABLE = ("steps", "device", "log_every", "eval_every", "val_tasks", "eval_tasks",
             "checkpoint_every", "tensorboard")  # fmt: skip
"""Settings that may change when a run is resumed; the others would change its results."""


def train(
    config: Config,
    out: str | Path,
    *,
    progress: bool | None = None,
    is_main: bool = True,
    gradient: Callable[..., tuple[Params, Metrics]] = outer_gradient,
) -> TrainResult:
    """Meta-train ``config`` in a new run folder ``out``; evaluate on the test split at the end.

    ``progress``: a bar (None: when stderr is a terminal), else log lines. ``is_main=False``
    writes nothing (distributed ranks other than 0); ``gradient`` replaces :func:`outer_gradient`.
    Raises ``ValueError`` for a folder that holds a run or other files, and
    :class:`TrainingError` for a non-finite meta-loss, naming the step and its tasks' seed.
    """
    check_device(config)
    config = data_root(config)
    source = TaskSource(config)
    run = RunDir.create(out, config, source.split_info, is_main=is_main)
    return _train(config, run, source, False, progress, is_main, gradient)


def resume(
    out: str | Path,
    *,
    progress: bool | None = None,
    is_main: bool = True,
    gradient: Callable[..., tuple[Params, Metrics]] = outer_gradient,
    **changes: Any,
) -> TrainResult:
    """Continue the run in ``out`` from its last checkpoint; ``changes``: only :data:`RESUMABLE`.

    With deterministic kernels the result is bit-identical to a run that never stopped.
    """
    run, config = RunDir.open(out, is_main=is_main)
    fixed = sorted(k for k, v in changes.items() if k not in RESUMABLE and v != _get(config, k))
    if fixed:
        raise ValueError(
            f"{', '.join(fixed)} cannot change when resuming (it would change the run's results; "
            f"only {', '.join(RESUMABLE)} can): start a new run with --out"
        )
    if changes:
        config = config.override(**changes)
        run.update_config(config)
    source = TaskSource(config)
    return _train(config, run, source, True, progress, is_main, gradient)


def _get(config: Config, name: str) -> Any:
    from metagrad.config import field_section

    return getattr(getattr(config, field_section(name)), name)


def _train(
    config: Config,
    run: RunDir,
    source: TaskSource,
    resumed: bool,
    progress: bool | None,
    is_main: bool,
    gradient: Callable[..., tuple[Params, Metrics]],
) -> TrainResult:
    try:
        with torch_settings(config):
            return _loop(config, run, source, resumed, progress, is_main, gradient)
    finally:
        run.close()


def _loop(
    config: Config,
    run: RunDir,
    source: TaskSource,
    resumed: bool,
    progress: bool | None,
    is_main: bool,
    gradient: Callable[..., tuple[Params, Metrics]],
) -> TrainResult:
    device = torch.device(config.run.device)
    seed = config.run.seed
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    model = build_model(config).to(device)
    theta = mg.params_of(model)
    estimator = build_estimator(config, model)
    evaluator = build_estimator(config, model, evaluation=True)
    optimizer = _optimizer(config, list(theta.values()))
    generator = torch.Generator()
    generators = {"tasks": generator}
    step = 0
    if resumed and (run.path / CHECKPOINT).is_file():
        state = load_checkpoint(run.path)  # on the CPU: random states must stay there
        with torch.no_grad():
            for k, p in theta.items():
                p.copy_(state["params"][k])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], generators)
        step = int(state["step"])
    run.start_logs(step, config.run.tensorboard)

    def checkpoint() -> None:
        if not all(bool(p.isfinite().all()) for p in theta.values()):
            raise TrainingError(f"non-finite parameters at step {step}: checkpoint not written")
        if is_main:
            save_checkpoint(
                run.path, step=step, params=theta, optimizer=optimizer, generators=generators
            )

    stop = StopOnSigint()
    bar = Progress(config.optim.steps, step, enabled=progress)
    window: dict[str, torch.Tensor] = {}
    window_start, window_steps = time.perf_counter(), 0
    try:
        with stop:
            while step < config.optim.steps and not stop.requested:
                for group in optimizer.param_groups:
                    group["lr"] = _lr(config, step)
                seed_t = task_seed(seed, step)
                tasks = source.sample(
                    "train", config.optim.meta_batch, generator.manual_seed(seed_t)
                )
                tasks = mg.Task(*(type(b)(*(t.to(device) for t in b)) for b in tasks))
                try:
                    grads, metrics = gradient(estimator, theta, tasks, config.algo.mode)
                except ValueError as e:
                    raise _diverged(run, step, seed_t, str(e)) from e
                scalars = _scalars(metrics)
                finite = torch.stack([g.isfinite().all() for g in grads.values()]).all()
                if not bool(finite & scalars["query_loss"].isfinite()):  # one sync per step
                    loss = scalars["query_loss"].item()
                    raise _diverged(run, step, seed_t, f"query loss {loss} or its gradient")
                for k, p in theta.items():
                    p.grad = grads[k]
                optimizer.step()
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
                    ev = _evaluate(config, evaluator, theta, source, "val", config.run.val_tasks)
                    run.log(step, ev.scalars(), prefix="val_")
                    bar.write(f"step {step}: validation {ev.summary()}")
                bar.update(step)
                if step % config.run.checkpoint_every == 0 or stop.requested:
                    checkpoint()
            if step == config.optim.steps and not stop.requested:
                checkpoint()
    finally:
        bar.close()
    result = TrainResult(run.path, step, theta, interrupted=stop.requested, history=run.metrics())
    if not stop.requested:
        ev = _evaluate(config, evaluator, theta, source, "test", config.run.eval_tasks)
        run.log(step, ev.scalars(), prefix="test_")
        run.write_json("eval_test.json", ev.to_dict())
        result.evaluation = ev
        if is_main and config.data.benchmark == "sinusoid":
            shots = config.data.eval_shots or config.data.shots
            seed = config.run.eval_seed
            result.plots.append(
                plot_sinusoid(evaluator, theta, run.path / "adapted.png", seed, shots)
            )
    if is_main and run.metrics():
        result.plots.insert(0, run.plot())
    return result


def _evaluate(
    config: Config, est: Any, theta: Params, source: Any, split: str, n: int
) -> Evaluation:
    return evaluate(est, theta, source, split, n, config.run.eval_seed, config.algo.mode)


def _diverged(run: RunDir, step: int, seed: int, what: str) -> TrainingError:
    ckpt = run.path / CHECKPOINT
    kept = (
        f"the last good checkpoint (step {load_checkpoint(run.path)['step']}) is kept in {ckpt}"
        if ckpt.is_file()
        else "no checkpoint had been written yet"
    )
    return TrainingError(
        f"non-finite meta-loss at step {step}, tasks drawn with "
        f"torch.Generator().manual_seed({seed}) ({what.split(':')[0]}); {kept}"
    )
