r"""Predictive uncertainty of probabilistic iMAML against MAML and iMAML.

Sinusoid regression: MAML (``sinusoid-maml``), iMAML (``sinusoid-imaml-gd``) and probabilistic
iMAML (``sinusoid-probabilistic-imaml``) are meta-trained with K = 10 support points for the same
number of outer steps, then adapted on K = 5 or 10 points of each of the same test curves with
their test-time steps (MAML 10, the others their 16 training steps) and scored on 100 other
points of the curve. The curves are noiseless, so
the spread a model should predict is its own uncertainty about the curve.

A point estimate has no spread of its own: MAML and iMAML are given a Gaussian likelihood
:math:`N(f_\phi(x), \tau^2)` with :math:`\tau` fitted on validation curves (the maximiser of the
pooled validation likelihood, :math:`\tau^2` = the validation MSE). Probabilistic iMAML predicts
the mixture of its posterior's networks plus its likelihood noise (:func:`metagrad.predictive`,
100 draws); it is scored with the noise it was trained with and, separately, with the noise
refitted on validation the same way (a grid over :math:`\tau`). Per test curve: the query MSE of
the predictive mean, the Gaussian NLL, the coverage of the central 50/90/95% intervals and the
calibration error (the mean of ``|coverage - level|``). A figure shows the predictive bands from 5
points of three test curves beside the true curves.

Omniglot 5-way 1-shot: MAML, iMAML-GD and probabilistic iMAML at the same number of outer steps,
scored by accuracy and expected calibration error (15 bins, pooled over the test tasks' query
predictions and per task) over the same test tasks; a probabilistic model predicts the mean of
its sampled softmax probabilities.

Every model is an ordinary resumable run under ``OUT/cells``::

    metagrad experiment uncertainty --out runs/experiments/uncertainty [--steps N]
    metagrad experiment uncertainty --quick                              # smoke test

``--steps`` sets the sinusoid models' outer steps (default 2,000); the Omniglot cells train
:data:`OMNIGLOT_STEPS` (a tenth of ``--steps`` when given). Omniglot needs ``--data`` or
``$METAGRAD_OMNIGLOT``; without it that part is skipped and the report says so.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metagrad._types import Posterior, Task
from metagrad.algorithms import predictive
from metagrad.experiments._cells import (
    Deadline,
    diverged_notes,
    machine,
    reject,
    run_or_note,
    save_figure,
)
from metagrad.experiments._report import Options, Report, Table
from metagrad.tasks import count, select, stack, task_at
from metagrad.training import (
    Config,
    Run,
    data_root,
    evaluate,
    load_run,
    mean_ci,
    preset,
    task_source,
    torch_settings,
)
from metagrad.training import calibration as cal
from metagrad.training.evaluate import fixed_tasks

DESCRIPTION = (
    "Probabilistic iMAML: sinusoid predictive NLL, MSE and interval coverage at K = 5/10 against "
    "MAML and iMAML with a fitted noise; Omniglot 5-way 1-shot accuracy and calibration error"
)

SINUSOID: dict[str, str] = {
    "MAML": "sinusoid-maml",
    "iMAML": "sinusoid-imaml-gd",
    "probabilistic iMAML": "sinusoid-probabilistic-imaml",
}
TEST_STEPS: dict[str, int | None] = {"MAML": 10, "iMAML": None, "probabilistic iMAML": None}
"""Test-time inner steps: MAML's 10 (its paper's Fig. 3); the others their 16 training steps."""
OMNIGLOT: dict[str, str] = {
    "MAML": "omniglot-5w1s-maml",
    "iMAML": "omniglot-5w1s-imaml-gd",
    "probabilistic iMAML": "omniglot-5w1s-probabilistic-imaml",
}
"""Row -> preset."""

SHOTS = (5, 10)
QUERIES = 100
SAMPLES = 100
NOISE_GRID = np.geomspace(1e-3, 10.0, 401)
"""The likelihood noise scales tried when a mixture's noise is refitted on validation."""
FULL = {"steps": 2000, "omniglot_steps": 300, "meta_batch": 8, "tasks": 600, "val_tasks": 200}
QUICK = {"steps": 20, "omniglot_steps": 2, "meta_batch": 2, "tasks": 20, "val_tasks": 10}
OMNIGLOT_STEPS = FULL["omniglot_steps"]
"""Outer steps of each Omniglot cell, on a meta-batch of ``FULL["meta_batch"]`` tasks for all
three models (the presets' 32 would make probabilistic iMAML's cell hours long on a CPU)."""
PLOT_CURVES = 3


def cell_config(name: str, table: dict[str, str], steps: int, device: str, tasks: int) -> Config:
    """Row ``name``'s training run: its preset shortened to ``steps`` outer steps."""
    changes = {"eval_inner_steps": TEST_STEPS[name]} if table is SINUSOID else {}
    return preset(table[name]).override(
        **changes,
        steps=steps,
        device=device,
        eval_every=0,
        log_every=max(1, min(100, steps // 10)),
        checkpoint_every=max(1, min(1000, steps)),
        eval_tasks=tasks,
        tensorboard=False,
    )


# -- sinusoid: predictions, a fitted noise, scores ------------------------------------------------


def predictions(run: Run, tasks: Task) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean, spread variance, y)`` on every query point, each ``tasks x queries``.

    The spread is the variance of the posterior's sampled outputs (its likelihood noise left
    out); a point estimate has none.
    """
    est, loss = run.estimator, run.estimator.loss
    means, spreads, ys = [], [], []
    for i in range(count(tasks)):
        task = task_at(tasks, i)
        adapted = est.adapt(run.params, task.support)
        with torch.no_grad():
            if isinstance(adapted, Posterior):
                pred = predictive(est, adapted, task.query.x, samples=SAMPLES)
                assert pred.std is not None
                mean, spread = pred.mean, pred.std**2 - est.noise_std**2
            else:
                mean = loss.predict(adapted, task.query.x)
                spread = torch.zeros_like(mean)
        means.append(mean.reshape(-1))
        spreads.append(spread.reshape(-1).clamp_min(0))
        ys.append(task.query.y.reshape(-1))
    return torch.stack(means).double(), torch.stack(spreads).double(), torch.stack(ys).double()


def fit_noise(mean: torch.Tensor, spread: torch.Tensor, y: torch.Tensor) -> float:
    """The likelihood noise that maximises the pooled likelihood of ``y`` under
    ``N(mean, spread + noise^2)``: the root mean squared error without spread, else the best of
    :data:`NOISE_GRID`."""
    if not bool((spread > 0).any()):
        return float(((y - mean) ** 2).mean().sqrt())
    nll = [float(cal.gaussian_nll(y, mean, (spread + t**2).sqrt())) for t in NOISE_GRID]
    return float(NOISE_GRID[int(np.argmin(nll))])


def scores(mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Per-curve MSE, NLL, coverage at 50/90/95% and calibration error: means and 95% CIs."""
    std = var.sqrt()
    per: dict[str, list[float]] = {"mse": [], "nll": [], "calibration": []}
    covered = []
    for i in range(mean.shape[0]):
        per["mse"].append(float(((mean[i] - y[i]) ** 2).mean()))
        per["nll"].append(float(cal.gaussian_nll(y[i], mean[i], std[i])))
        c = cal.coverage(y[i], mean[i], std[i])
        covered.append(c)
        per["calibration"].append(float(cal.calibration_error(c)))
    out: dict[str, Any] = {k: mean_ci(v) for k, v in per.items()}
    out["coverage"] = torch.stack(covered).mean(0).tolist()
    return out


def _tasks(run: Run, shots: int, split: str, n: int) -> Task:
    """``n`` fixed tasks of ``split`` with ``shots`` support and :data:`QUERIES` query points."""
    r = run.with_config(eval_shots=shots, queries=QUERIES)
    source = task_source(r.config.data)
    g = torch.Generator().manual_seed(r.config.run.eval_seed + (0 if split == "test" else 1))
    return select(source.sample(split, n, g), slice(0, n))


def sinusoid_cell(run: Run, tasks: int, val_tasks: int) -> dict[str, Any]:
    """Every score of one model at each K (noise fitted on validation; a mixture also as is)."""
    out: dict[str, Any] = {}
    for k in SHOTS:
        val = predictions(run, _tasks(run, k, "val", val_tasks))
        test = predictions(run, _tasks(run, k, "test", tasks))
        noise = fit_noise(*val)
        mean, spread, y = test
        entry = {"fitted": {"noise": noise, **scores(mean, spread + noise**2, y)}}
        if bool((spread > 0).any()):
            own = float(run.estimator.noise_std)
            entry["own"] = {"noise": own, **scores(mean, spread + own**2, y)}
        out[f"K{k}"] = entry
    return out


def _fmt(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.3f} ± {pair[1]:.3f}" if math.isfinite(pair[0]) else "diverged"


def sinusoid_table(results: dict[str, dict[str, Any]], steps: int, tasks: int) -> Table:
    table = Table(
        "uncertainty_sinusoid",
        f"Sinusoid: predictive scores on {tasks} test curves ({QUERIES} query points each) after "
        f"adapting on K points, {steps} outer steps each",
        ["model", "noise", "K", "MSE", "NLL", "coverage 50/90/95%", "calibration error"],
        notes=[
            "Mean ± 95% CI over the test curves. noise: the likelihood's std (fitted: on "
            "validation curves; trained: the model's own). Calibration error: the mean of "
            "|coverage - level| over the three levels, per curve.",
        ],
    )
    for name in SINUSOID:
        if name not in results:
            table.rows.append([name, None, None, None, None, None, None])
            continue
        for k in SHOTS:
            entry = results[name][f"K{k}"]
            for kind in ("own", "fitted"):
                if kind not in entry:
                    continue
                e = entry[kind]
                label = f"{e['noise']:.3f} ({'trained' if kind == 'own' else 'fitted'})"
                cover = "/".join(f"{100 * c:.0f}" for c in e["coverage"])
                row = [name, label, k, _fmt(e["mse"]), _fmt(e["nll"]), cover]
                table.rows.append(row + [_fmt(e["calibration"])])
    return table


def band_figure(runs: dict[str, Run], noises: dict[str, float], path: Path) -> Path:
    """Predictive mean ± 2 std from 5 points of :data:`PLOT_CURVES` test curves, per model, with
    the likelihood noise ``noises[name]`` added to its spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    fig, axes = plt.subplots(
        PLOT_CURVES, len(names), figsize=(3.6 * len(names), 2.6 * PLOT_CURVES), squeeze=False
    )
    grid = torch.linspace(-5, 5, 200).reshape(-1, 1)
    for j, name in enumerate(names):
        run = runs[name]
        tasks = _tasks(run, 5, "test", PLOT_CURVES)
        noise = noises[name]
        for i in range(PLOT_CURVES):
            task = task_at(tasks, i)
            dense = Task(task.support, type(task.query)(grid, _truth(task, grid)))
            mean, spread, y = predictions(run, stack([dense]))
            sd = (spread + noise**2).sqrt()[0]
            ax = axes[i][j]
            x = grid.reshape(-1).numpy()
            ax.plot(x, y[0].numpy(), "k--", lw=1, label="true curve")
            ax.plot(x, mean[0].numpy(), "C0", lw=1.5, label="predictive mean")
            ax.fill_between(x, (mean[0] - 2 * sd).numpy(), (mean[0] + 2 * sd).numpy(), alpha=0.25)
            ax.scatter(
                task.support.x.reshape(-1), task.support.y.reshape(-1), c="C3", s=18, zorder=3
            )
            if i == 0:
                ax.set_title(f"{name} (±2 std)", fontsize=9)
            ax.set_ylim(-6, 6)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(
        "Predictive bands from 5 support points (red) of three test curves; MAML and iMAML with "
        "the noise fitted on validation, probabilistic iMAML with its own",
        fontsize=9,
    )
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def _truth(task: Task, x: torch.Tensor) -> torch.Tensor:
    """The true curve through a task's query points, at ``x`` (amplitude and phase fitted)."""
    qx, qy = task.query.x.reshape(-1).double(), task.query.y.reshape(-1).double()
    basis = torch.stack([torch.sin(qx), torch.cos(qx)], 1)  # A sin(x - p) = a sin x + b cos x
    coef = torch.linalg.lstsq(basis, qy.reshape(-1, 1)).solution.reshape(-1)
    xs = x.reshape(-1).double()
    curve = coef[0] * torch.sin(xs) + coef[1] * torch.cos(xs)
    return curve.reshape(x.shape).to(task.query.y.dtype)


# -- Omniglot ----------------------------------------------------------------------------------


def omniglot_cell(run: Run, tasks: int) -> dict[str, Any]:
    """Accuracy and expected calibration error on ``tasks`` test tasks.

    The ECE is reported twice: over each task's own query predictions (5 of them in 5-way
    1-shot, so a perfectly calibrated model still scores far from 0) and pooled over every test
    task's query predictions, the usual reading, with a 95% interval from resampling the tasks.
    """
    source = task_source(run.config.data)
    ev = evaluate(run.estimator, run.params, source, "test", tasks, run.config.run.eval_seed)
    probs, labels = query_probabilities(run, source, tasks)
    pairs = zip(probs, labels, strict=True)
    per_task = [float(cal.expected_calibration_error(p, y)) for p, y in pairs]
    return {
        "accuracy": (ev.accuracy, ev.accuracy_ci),
        "ece": mean_ci(per_task),
        "pooled_ece": pooled_ece(probs, labels),
    }


def query_probabilities(
    run: Run, source: Any, tasks: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each test task's query class probabilities after adapting on its support set, and its
    labels, on the tasks :func:`evaluate` scores: a point estimate's softmax, a posterior's
    predictive mean (:func:`metagrad.predictive`, :data:`SAMPLES` draws)."""
    chosen = fixed_tasks(source, "test", tasks, run.config.run.eval_seed)
    est = run.estimator
    probs, labels = [], []
    for i in range(count(chosen)):
        task = task_at(chosen, i)
        adapted = est.adapt(run.params, task.support)
        with torch.no_grad():
            if isinstance(adapted, Posterior):
                p = predictive(est, adapted, task.query.x, samples=SAMPLES).mean
            else:
                p = est.loss.predict(adapted, task.query.x).softmax(-1)
        probs.append(p.reshape(-1, p.shape[-1]))
        labels.append(task.query.y.reshape(-1))
    return probs, labels


def pooled_ece(
    probs: list[torch.Tensor], labels: list[torch.Tensor], resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """The ECE of every task's predictions together, and the half-width of its 95% interval
    from ``resamples`` bootstrap draws of the tasks (half the 2.5-97.5 percentile range)."""
    value = float(cal.expected_calibration_error(torch.cat(probs), torch.cat(labels)))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        pick = rng.integers(0, len(probs), len(probs)).tolist()
        draws.append(
            float(
                cal.expected_calibration_error(
                    torch.cat([probs[i] for i in pick]), torch.cat([labels[i] for i in pick])
                )
            )
        )
    low, high = np.percentile(draws, [2.5, 97.5])
    return value, float(high - low) / 2


def omniglot_table(results: dict[str, dict[str, Any]], steps: int, tasks: int, note: str) -> Table:
    table = Table(
        "uncertainty_omniglot",
        f"Omniglot 5-way 1-shot: accuracy and expected calibration error, {steps} outer steps "
        f"each, {tasks} test tasks",
        ["model", "preset", "accuracy (%)", "ECE, pooled", "ECE, per task"],
        notes=[
            "Mean ± 95% CI over the test tasks. ECE over 15 confidence bins: pooled over every "
            "test task's query predictions (± half the 95% interval of 1,000 bootstrap draws "
            "of the tasks), and per task, on its own 5 query predictions (far from 0 even for "
            "a calibrated model, a small-sample effect)."
        ]
        + ([note] if note else []),
    )
    for name, preset_name in OMNIGLOT.items():
        r = results.get(name)
        if r is None:
            table.rows.append([name, preset_name, None, None, None])
            continue
        acc, ci = r["accuracy"]
        table.rows.append(
            [
                name,
                preset_name,
                f"{100 * acc:.2f} ± {100 * ci:.2f}",
                _fmt(r["pooled_ece"]),
                _fmt(r["ece"]),
            ]
        )
    return table


# -- the experiment ----------------------------------------------------------------------------


def run(options: Options) -> Report:
    """Train (or resume) every cell, score the finished ones, assemble the tables and figure."""
    reject(options, "uncertainty", "seeds", "lake_runs", "cells")
    start = time.perf_counter()
    budget = QUICK if options.quick else FULL
    steps = options.steps or budget["steps"]
    omniglot_steps = budget["omniglot_steps"] if options.steps is None else max(1, steps // 10)
    tasks, val_tasks = budget["tasks"], budget["val_tasks"]
    deadline = Deadline(options.budget_minutes)
    cells = Path(options.out) / "cells"
    failed: list[str] = []

    sin_results, runs = {}, {}
    for name in SINUSOID:
        config = cell_config(name, SINUSOID, steps, options.device, tasks)
        path = cells / "sinusoid" / SINUSOID[name]
        if not run_or_note(config, path, failed, deadline):
            continue
        runs[name] = load_run(path, options.device)
        with torch_settings(config):
            sin_results[name] = sinusoid_cell(runs[name], tasks, val_tasks)
    tables = [sinusoid_table(sin_results, steps, tasks)]
    figures = []
    if runs:
        # a point estimate is drawn with the noise fitted at K = 5, a posterior with its own
        noises = {
            n: sin_results[n]["K5"].get("own", sin_results[n]["K5"]["fitted"])["noise"]
            for n in runs
        }
        with torch_settings(next(iter(runs.values())).config):
            figures.append(band_figure(runs, noises, Path(options.out) / "uncertainty_bands.png"))

    om_results: dict[str, dict[str, Any]] = {}
    note = ""
    for name in OMNIGLOT:
        config = cell_config(name, OMNIGLOT, omniglot_steps, options.device, tasks)
        if options.data is not None:
            config = config.override(root=str(options.data))
        config = config.override(meta_batch=budget["meta_batch"])
        try:
            config = data_root(config)
        except ValueError as e:  # no Omniglot here: the sinusoid part stands alone
            note = f"Not run: {e}."
            break
        path = cells / "omniglot" / OMNIGLOT[name]
        if not run_or_note(config, path, failed, deadline):
            continue
        loaded = load_run(path, options.device)
        with torch_settings(config):
            om_results[name] = omniglot_cell(loaded, tasks)
    tables.append(omniglot_table(om_results, omniglot_steps, tasks, note))
    tables[-1].notes.append(
        f"Every model trained on meta-batches of {budget['meta_batch']} tasks (the presets' 32 "
        "would make probabilistic iMAML's cell hours long on a CPU); otherwise its preset."
    )
    for table in tables:
        table.notes += diverged_notes(failed)
    info = {
        "machine": machine(options.device),
        "seconds": time.perf_counter() - start,
        "sinusoid": sin_results,
        "omniglot": om_results,
    }
    return Report("uncertainty", tables, figures, info)
