"""Evaluation on fixed, seeded tasks: mean and 95% confidence interval over the tasks.

``evaluate`` adapts the meta-parameters on each task's support set with the test-time steps and
scores the query set: the loss before and after adaptation (MSE for regression) and, for
classification, the accuracy. The tasks come from a generator seeded with ``eval_seed``, the
split and the chunk index only, so every run and every call sees the same tasks::

    metagrad eval runs/x --tasks 600 --split test
    metagrad eval runs/x --lake-runs PATH            # error rate on Lake's 20 one-shot runs
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metagrad import autodiff
from metagrad._types import Batch, Params, Task
from metagrad.algorithms import Posterior, predictive
from metagrad.data import LakeRuns, TaskSource
from metagrad.tasks import count, join, select, task_at
from metagrad.training import calibration
from metagrad.training.build import task_source
from metagrad.training.reduce import Local, Reducer
from metagrad.training.run import Run, RunDir, load_run, torch_settings

CHUNK = 50  # tasks sampled per generator seed; fixed, so that the task sets never change
SPLITS = {"train": 0, "val": 1, "test": 2}
Z95 = 1.959964  # two-sided 95% quantile of the standard normal


def eval_seed(seed: int, split: str, chunk: int) -> int:
    """The seed of evaluation chunk ``chunk`` of ``split``."""
    return int(np.random.SeedSequence([seed, SPLITS[split], chunk]).generate_state(1, np.uint64)[0])


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% normal confidence interval (0 for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    half = Z95 * a.std(ddof=1) / math.sqrt(len(a)) if len(a) > 1 else 0.0
    return float(a.mean()), float(half)


@dataclass
class Evaluation:
    """The result of :func:`evaluate`: means and 95% half-widths over ``tasks`` tasks."""

    split: str
    tasks: int
    steps: int
    loss_before: float
    loss_before_ci: float
    loss: float
    loss_ci: float
    accuracy: float | None = None
    accuracy_ci: float | None = None
    nll: float | None = None
    nll_ci: float | None = None
    calibration: float | None = None
    calibration_ci: float | None = None
    coverage: list[float] | None = None

    def scalars(self) -> dict[str, float]:
        """The numbers, for ``metrics.jsonl`` and TensorBoard."""
        keys = ("loss_before", "loss", "accuracy", "accuracy_ci", "nll", "calibration")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line: accuracy (classification) or the MSE before and after adaptation; with a
        posterior, its predictive NLL and calibration too."""
        if self.split == "lake" and self.accuracy is not None:
            text = f"error rate {100 * (1 - self.accuracy):.2f}% over {self.tasks} runs"
            return f"{text} (Lake's one-shot runs, {self.steps} steps)"
        if self.accuracy is not None:
            text = f"accuracy {100 * self.accuracy:.2f} +- {100 * self.accuracy_ci:.2f}%"  # type: ignore[operator]
        else:
            text = (
                f"MSE {self.loss_before:.3f} +- {self.loss_before_ci:.3f} before adaptation, "
                f"{self.loss:.3f} +- {self.loss_ci:.3f} after"
            )
        if self.nll is not None:
            name = "ECE" if self.accuracy is not None else "calibration error"
            text += f"; predictive NLL {self.nll:.3f} +- {self.nll_ci:.3f}, {name}"
            text += f" {self.calibration:.3f}"
            if self.coverage is not None:
                text += ", coverage " + "/".join(f"{100 * c:.0f}" for c in self.coverage)
                text += "% of the 50/90/95% intervals"
        return f"{text} ({self.tasks} {self.split} tasks, {self.steps} steps)"


def inner_steps(estimator: Any) -> int:
    """The number of inner steps the estimator adapts with (0 if its solver has none)."""
    return int(getattr(estimator.inner, "steps", 0))


PREDICTIVE_SAMPLES = 100
"""Parameter draws per predictive distribution in an evaluation."""


def _scores(estimator: Any, theta: Params, task: Task) -> torch.Tensor:
    """The :data:`~.reduce.SCORES` of one task (accuracy 0 for regression; 0 without posterior).

    For an estimator whose ``adapt`` gives a :class:`~metagrad.Posterior`, the losses and the
    accuracy are those of the posterior mean, and the predictive distribution
    (:func:`~metagrad.predictive`) gives the negative log-likelihood of the query targets with
    its calibration: the coverage of the 50/90/95% intervals and their mean gap (regression), or
    the expected calibration error (classification).
    """
    loss = estimator.loss
    model_params = getattr(estimator, "model_params", None)
    init = theta if model_params is None else model_params(theta)
    adapted = estimator.adapt(theta, task.support)
    posterior = isinstance(adapted, Posterior)
    phi = adapted.mean if posterior else adapted
    with torch.no_grad():
        before, after = loss(init, task.query), loss(phi, task.query)
        acc = loss.accuracy(phi, task.query) if loss.is_classification else torch.zeros_like(after)
        extra = [torch.zeros_like(after)] * 5
        if posterior:
            extra = _uncertainty(estimator, adapted, task.query, loss.is_classification)
    return torch.stack([before, after, acc, *(e.to(after.dtype) for e in extra)])


def _uncertainty(estimator: Any, q: Posterior, query: Batch, classify: bool) -> list[torch.Tensor]:
    """``[nll, calibration error, coverage at 50/90/95%]`` of the query set under ``q``."""
    pred = predictive(estimator, q, query.x, samples=PREDICTIVE_SAMPLES)
    if classify:
        p = pred.mean.gather(-1, query.y.reshape(-1, 1)).clamp_min(
            torch.finfo(pred.mean.dtype).tiny
        )
        ece = calibration.expected_calibration_error(pred.mean, query.y)
        zero = torch.zeros_like(ece)
        return [-p.log().mean(), ece, zero, zero, zero]
    assert pred.std is not None
    covered = calibration.coverage(query.y, pred.mean, pred.std)
    nll = calibration.gaussian_nll(query.y, pred.mean, pred.std)
    return [nll, calibration.calibration_error(covered), *covered.unbind()]


def evaluate_tasks(
    estimator: Any,
    theta: Params,
    tasks: Task,
    split: str,
    mode: str = "loop",
    reducer: Reducer | None = None,
) -> Evaluation:
    """Adapt on each task's support set, score its query set; mean and 95% CI over the tasks.

    ``tasks`` are stacked on dim 0; ``mode="vmap"`` vectorises over them, ``"loop"`` does not.
    ``reducer`` decides where the tasks are scored (default :class:`~.reduce.Local`: here).
    """
    theta = {k: v.detach() for k, v in theta.items()}

    def score(tasks: Task) -> torch.Tensor:
        if mode == "vmap":
            with autodiff.use("func"):  # torch.func.vmap over the tasks, applied here
                return torch.func.vmap(lambda t: _scores(estimator, theta, t))(tasks)
        return torch.stack(
            [_scores(estimator, theta, task_at(tasks, i)) for i in range(count(tasks))]
        )

    scores = (reducer or Local()).score(score, tasks)
    before, after, acc, nll, cal, *cov = scores.double().T.tolist()
    steps = inner_steps(estimator)
    ev = Evaluation(split, len(before), steps, *mean_ci(before), *mean_ci(after))
    if estimator.loss.is_classification:
        ev.accuracy, ev.accuracy_ci = mean_ci(acc)
    if hasattr(estimator, "posterior"):
        ev.nll, ev.nll_ci = mean_ci(nll)
        ev.calibration, ev.calibration_ci = mean_ci(cal)
        if not estimator.loss.is_classification:
            ev.coverage = [mean_ci(c)[0] for c in cov]
    return ev


def evaluate(
    estimator: Any,
    theta: Params,
    source: TaskSource,
    split: str = "test",
    tasks: int = 600,
    seed: int = 0,
    mode: str = "loop",
    reducer: Reducer | None = None,
) -> Evaluation:
    """Evaluate on ``tasks`` fixed tasks of ``split`` drawn by ``source.sample(split, n, gen)``.

    ``estimator`` adapts with the test-time steps (``build_estimator(..., evaluation=True)``).
    A source with fixed tasks (``source.fixed(split)``, e.g. Leap's alphabets) gives those.
    """
    device = next(iter(theta.values())).device
    chosen = fixed_tasks(source, split, tasks, seed, device)
    return evaluate_tasks(estimator, theta, chosen, split, mode, reducer)


def fixed_tasks(
    source: TaskSource, split: str, tasks: int, seed: int, device: torch.device | str = "cpu"
) -> Task:
    """The ``tasks`` fixed evaluation tasks of ``split`` that :func:`evaluate` scores: the
    source's own fixed tasks if it has them, else seeded chunks of :data:`CHUNK` tasks."""
    fixed = source.fixed(split)
    if fixed is not None:
        return join([fixed], device)
    batches = []
    for chunk in range(math.ceil(tasks / CHUNK)):
        g = torch.Generator().manual_seed(eval_seed(seed, split, chunk))
        keep = min(CHUNK, tasks - chunk * CHUNK)
        batches.append(select(source.sample(split, CHUNK, g), slice(0, keep)))
    return join(batches, device)


def evaluate_run(
    path: str | Path,
    *,
    tasks: int | None = None,
    split: str = "test",
    lake_runs: str | Path | None = None,
    data: str | None = None,
    device: str | None = None,
    steps: int | None = None,
    report: Callable[[Evaluation], None] | None = None,
) -> tuple[Evaluation, Path]:
    """Evaluate the run in ``path`` (its latest checkpoint) and write the result there as JSON.

    ``lake_runs``: the error rate on Lake's one-shot runs (a 20-way Omniglot run) instead.
    ``data``, ``device``, ``steps`` override the run's data folder, device and test-time steps.
    ``report`` is called with the result before it is written, so a failed write (``OSError``
    naming the file) loses nothing.
    """
    if tasks is not None and tasks < 1:
        raise ValueError(f"--tasks must be a positive number of tasks, got {tasks}")
    run = load_run(path, device or "cpu")
    changes = {"root": data, "device": device, "eval_inner_steps": steps}
    run = run.with_config(**{k: v for k, v in changes.items() if v is not None})
    with torch_settings(run.config):
        ev, name = _evaluate_run(run, tasks, split, lake_runs)
    if report is not None:
        report(ev)
    try:
        return ev, RunDir(run.path).write_json(name, {"step": run.step, **ev.to_dict()})
    except OSError as e:
        raise OSError(
            f"could not write {run.path / name} ({e.strerror or e}): the result above is not "
            "saved there; check the folder's permissions and free space, or keep the printed line"
        ) from None


def _evaluate_run(
    run: Run, tasks: int | None, split: str, lake_runs: str | Path | None
) -> tuple[Evaluation, str]:
    mode = run.config.algo.mode
    if lake_runs is not None:
        if run.config.data.benchmark == "sinusoid" or run.config.data.ways != 20:
            raise ValueError(
                f"Lake's runs are 20-way Omniglot problems; this run is "
                f"{run.config.data.benchmark} with ways={run.config.data.ways}"
            )
        task = join([LakeRuns(lake_runs).task()], next(iter(run.params.values())).device)
        ev = evaluate_tasks(run.estimator, run.params, task, "lake", mode)
        name = "eval_lake.json"
    else:
        n = run.config.run.eval_tasks if tasks is None else tasks
        source = task_source(run.config.data)
        ev = evaluate(run.estimator, run.params, source, split, n, run.config.run.eval_seed, mode)
        name = f"eval_{split}.json"
    return ev, name
