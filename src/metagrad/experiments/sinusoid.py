r"""Sinusoid regression (Finn, Abbeel & Levine 2017, Sec. 5.1, Figs. 2 and 3).

Tasks are curves :math:`y = A \sin(x - \varphi)`, :math:`A \sim U[0.1, 5]`,
:math:`\varphi \sim U[0, \pi]`, :math:`x \sim U[-5, 5]`; the network is MAML's 1-40-40-1 ReLU MLP.
Each of MAML, FOMAML, Reptile, iMAML, Leap and ANIL is meta-trained with its ``sinusoid-*`` preset
(K = 10 support points, meta-batch 25, Adam 1e-3; Reptile keeps its outer SGD step 0.1 annealed
to 0, here on a meta-batch of 25 tasks), for the same number of outer steps. The baseline is the
paper's *pre-trained* model: ordinary regression on the query points of the same stream of tasks,
which is FOMAML with zero inner steps (its gradient is :math:`\nabla_\theta L_q(\theta)`).

At test time each model is fine-tuned by gradient descent on K = 5, 10 or 20 points of a new
curve for 1, 5 and 10 steps, with its own training inner step size (0.01; Reptile 0.02; iMAML
0.005, on its proximal objective), and scored by the mean squared error on 100 other points of the
curve, over the same fixed test tasks for every model. As in the paper, the pre-trained model's
step size is tuned automatically: for each K and step count, the best of :data:`FINE_TUNE_LRS`
on validation tasks (never the test tasks).

Every model is an ordinary run folder under ``OUT/cells/sinusoid`` (resumable)::

    metagrad experiment sinusoid --out runs/exp/sinusoid            # full: 2,000 outer steps each
    metagrad experiment sinusoid --quick                            # smoke test, about a minute
    metagrad experiment sinusoid --steps 10000 --seeds 3 --out ...  # longer runs continue
    metagrad experiment sinusoid --budget-minutes 30                # no new cell after 30 min

With several seeds the ± is the 95% interval over the seeds, with one over the test tasks.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from metagrad.experiments._cells import (
    Deadline,
    diverged_notes,
    machine,
    reject,
    run_or_note,
    save_figure,
)
from metagrad.experiments._report import Options, Report, Table
from metagrad.training import (
    Config,
    Run,
    evaluate,
    load_run,
    mean_ci,
    preset,
    task_source,
    torch_settings,
)

DESCRIPTION = (
    "MAML Sec. 5.1, Figs. 2-3: sinusoid MSE after 1/5/10 steps, K = 5/10/20, six meta-learners "
    "against a pre-trained model"
)

ALGORITHMS: dict[str, tuple[str, dict[str, Any]]] = {
    "MAML": ("sinusoid-maml", {}),
    "FOMAML": ("sinusoid-fomaml", {}),
    "Reptile": ("sinusoid-reptile", {"meta_batch": 25}),
    "iMAML": ("sinusoid-imaml-gd", {}),
    "Leap": ("sinusoid-leap", {}),
    "ANIL": ("sinusoid-anil", {}),
    "pre-trained": ("sinusoid-fomaml", {"inner_steps": 0}),
}
"""Row name -> (preset, overrides)."""

PAPER = {"MAML": (0.67, 0.38, 0.35), "pre-trained": (2.41, 2.23, 2.19)}
"""The MAML paper's K = 10 figures after 1, 5, 10 steps, as quoted in issue 5 (read off Fig. 3)."""

SHOTS = (5, 10, 20)
STEPS = (1, 5, 10)
FINE_TUNE_LRS = (0.001, 0.003, 0.01, 0.03, 0.1)
EVAL_QUERIES = 100
SEED = 2  # of the plotted test curve (amplitude 3.1, phase 1.2)
FULL = {"steps": 2000, "tasks": 600}
QUICK = {"steps": 30, "tasks": 50}


def cell_config(name: str, steps: int, seed: int, device: str, tasks: int) -> Config:
    """The training run of row ``name``: its preset, shortened to ``steps`` outer steps."""
    preset_name, changes = ALGORITHMS[name]
    return preset(preset_name).override(
        **changes,
        steps=steps,
        seed=seed,
        device=device,
        eval_inner_steps=10,
        eval_every=0,
        log_every=min(100, steps),
        checkpoint_every=500,
        eval_tasks=tasks,
        tensorboard=False,
    )


def _mse(run: Run, shots: int, steps: int, split: str, tasks: int, lr: float | None = None):
    """Query MSE (an :class:`~metagrad.training.Evaluation`) after ``steps`` steps on ``shots``."""
    changes: dict[str, Any] = {"eval_shots": shots, "eval_inner_steps": steps}
    changes["queries"] = EVAL_QUERIES
    if lr is not None:
        changes["inner_lr"] = lr
    r = run.with_config(**changes)
    source = task_source(r.config.data)
    return evaluate(r.estimator, r.params, source, split, tasks, r.config.run.eval_seed, "vmap")


def _score(run: Run, tuned: bool, shots: int, steps: int, tasks: int) -> dict[str, float]:
    """MSE mean, 95% half-width and step size; ``tuned``: the best step size on validation."""
    lr = None
    if tuned and steps > 0:

        def val(lr: float) -> float:
            with warnings.catch_warnings():  # a diverging step size: inf losses, nan spread
                warnings.simplefilter("ignore", RuntimeWarning)
                loss = _mse(run, shots, steps, "val", tasks, lr).loss
            return loss if math.isfinite(loss) else math.inf

        lr = min(FINE_TUNE_LRS, key=val)
    ev = _mse(run, shots, steps, "test", tasks, lr)
    loss, ci = (ev.loss_before, ev.loss_before_ci) if steps == 0 else (ev.loss, ev.loss_ci)
    return {"mse": loss, "ci": ci, "lr": lr if lr is not None else run.config.algo.inner_lr}


def _cell_scores(run: Run, tuned: bool, tasks: int) -> dict[str, dict[str, float]]:
    """Scores keyed ``K{k}-s{steps}``: the grid, and 0..10 steps at K = 10 (the curve)."""
    keys = sorted({(k, s) for k in SHOTS for s in STEPS} | {(10, s) for s in range(11)})
    return {f"K{k}-s{s}": _score(run, tuned, k, s, tasks) for k, s in keys}


def _summary(per_seed: list[dict[str, dict[str, float]]], key: str) -> tuple[float, float]:
    """Mean over seeds; 95% half-width over the tasks (one seed) or over the seeds."""
    means = [s[key]["mse"] for s in per_seed]
    return (means[0], per_seed[0][key]["ci"]) if len(means) == 1 else mean_ci(means)


def _fmt(pair: tuple[float, float] | None) -> str | None:
    return None if pair is None else f"{pair[0]:.3f} ± {pair[1]:.3f}"


def run(options: Options) -> Report:
    """Train (or resume) every cell, then evaluate the finished ones and assemble the tables."""
    reject(options, "sinusoid", "data", "lake_runs", "cells")
    start = time.perf_counter()
    budget = QUICK if options.quick else FULL
    steps = options.steps or budget["steps"]
    tasks = budget["tasks"]
    seeds = list(range(options.seeds or 1))
    deadline = Deadline(options.budget_minutes)
    cells = Path(options.out) / "cells" / "sinusoid"
    results: dict[str, list[dict[str, dict[str, float]]]] = {}
    runs: dict[str, Run] = {}
    failed: list[str] = []
    for name in ALGORITHMS:
        for seed in seeds:
            path = cells / f"{name}-seed{seed}"
            config = cell_config(name, steps, seed, options.device, tasks)
            if not run_or_note(config, path, failed, deadline):  # diverged: missing, noted
                continue
            loaded = load_run(path, options.device)
            with torch_settings(config):
                results.setdefault(name, []).append(
                    _cell_scores(loaded, name == "pre-trained", tasks)
                )
            runs.setdefault(name, loaded)

    def cell(name: str, key: str) -> str | None:
        return _fmt(_summary(results[name], key)) if name in results else None

    ci_over = "the test tasks" if len(seeds) == 1 else f"the {len(seeds)} seeds"
    common = [
        f"Meta-training: {steps} outer steps for every model (the paper trains 70,000), "
        f"{len(seeds)} seed(s); mean ± 95% CI over {ci_over}; {tasks} test tasks, "
        f"{EVAL_QUERIES} query points each.",
        "Fine-tuning step size: each model's training inner lr (0.01; Reptile 0.02; iMAML "
        f"0.005); the pre-trained model's is the best of {FINE_TUNE_LRS} on validation tasks.",
    ] + diverged_notes(failed)
    main = Table(
        "sinusoid_k10",
        "Sinusoid, K = 10: query MSE after fine-tuning, beside the MAML paper",
        ["model", "0 steps", "1 step", "5 steps", "10 steps", "paper 1 / 5 / 10"],
        notes=common + ["Paper: MAML Fig. 3 / Sec. 5.1 as quoted in issue 5 (read off a figure)."],
    )
    for name in ALGORITHMS:
        paper = " / ".join(f"{v:.2f}" for v in PAPER[name]) if name in PAPER else ""
        main.rows.append(
            [name] + [cell(name, f"K10-s{s}") for s in (0, *STEPS)] + [paper or "not reported"]
        )
    grid = Table(
        "sinusoid_grid",
        "Sinusoid: query MSE after 1 / 5 / 10 steps with K = 5, 10, 20 support points",
        ["model", "K"] + [f"{s} step{'s' * (s > 1)}" for s in STEPS],
        notes=common,
    )
    for name in ALGORITHMS:
        for k in SHOTS:
            grid.rows.append([name, k] + [cell(name, f"K{k}-s{s}") for s in STEPS])
    out = Path(options.out)
    figures = []
    if results:
        figures.append(_plot_curve(results, out / "sinusoid_mse.png"))
    if "MAML" in runs and "pre-trained" in runs:
        tuned = {k: results["pre-trained"][0][f"K{k}-s10"]["lr"] for k in SHOTS}
        figures.append(_plot_adapted(runs["MAML"], runs["pre-trained"], tuned, out))
    info = {
        "machine": machine(options.device),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "outer_steps": steps,
        "seeds": len(seeds),
        "test_tasks": tasks,
        "results": results,
        "failed": failed,
    }
    return Report("sinusoid", [main, grid], figures, info)


def _plot_curve(results: dict[str, list[dict[str, dict[str, float]]]], path: Path) -> Path:
    """Query MSE against fine-tuning steps at K = 10 for every model (the paper's Fig. 3)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    from matplotlib.ticker import ScalarFormatter

    ax = fig.add_subplot()
    colors = {name: "k" if name == "pre-trained" else f"C{i}" for i, name in enumerate(ALGORITHMS)}
    for name, per_seed in results.items():
        ys = [_summary(per_seed, f"K10-s{s}")[0] for s in range(11)]
        style = "--" if name == "pre-trained" else "-"
        ax.plot(range(11), ys, style, color=colors[name], marker=".", label=name)
    for name, marks in PAPER.items():
        ax.plot(STEPS, marks, "x", color=colors[name], ms=8, label=f"paper: {name}")
    ax.set(xlabel="gradient steps at test time", ylabel="query MSE", yscale="log")
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis(ScalarFormatter())
    ax.set_title("K = 10 support points", fontsize="medium")
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return save_figure(fig, path)


def _plot_adapted(maml: Run, pretrained: Run, lrs: dict[int, float], out: Path) -> Path:
    """One test curve per K: the truth, K points, MAML and the pre-trained model fine-tuned."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from metagrad.data import Sinusoid

    fig = Figure(figsize=(12, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    grid = torch.linspace(-5, 5, 200).view(-1, 1)
    for i, k in enumerate(SHOTS):
        # The same curve for every K (amplitude and phase are the first draws; the K points of
        # a smaller K are the first of a larger one's), SEED gives amplitude 3.1.
        task, truth = Sinusoid(shots=k).sample_with_params(1, torch.Generator().manual_seed(SEED))
        support = type(task.support)(task.support.x[0], task.support.y[0])
        ax = fig.add_subplot(1, len(SHOTS), i + 1)
        ax.plot(grid[:, 0], truth.curve(grid[:, 0])[0, :, 0], "k-", label="truth")
        for run, label, style, lr in (
            (maml, "MAML", "-", None),
            (pretrained, "pre-trained", "--", lrs[k]),
        ):
            for steps, alpha in ((1, 0.5), (10, 1.0)):
                changes: dict[str, Any] = {"eval_inner_steps": steps}
                if lr is not None:
                    changes["inner_lr"] = lr
                r = run.with_config(**changes)
                phi = r.estimator.adapt(r.params, support)
                with torch.no_grad():
                    y = r.estimator.loss.predict(phi, grid.to(next(iter(phi.values())).device))
                color = "C0" if label == "MAML" else "C3"
                ax.plot(grid[:, 0], y[:, 0].cpu(), style, color=color, alpha=alpha,
                        label=f"{label}, {steps} step{'s' * (steps > 1)}")  # fmt: skip
        ax.plot(support.x[:, 0], support.y[:, 0], "k^", label=f"{k} points")
        ax.set_title(f"K = {k}", fontsize="medium")
        if i == 0:
            ax.legend(fontsize="x-small")
    return save_figure(fig, out / "sinusoid_adapted.png")
