r"""Leap's Omniglot experiment (Flennerhag et al. 2019, Sec. 4.1, Fig. 3).

Each alphabet with at least 20 characters is one 20-way task (15 drawings per character to train
on, 5 held out: :func:`metagrad.data.alphabet_tasks`); 10 alphabets are held out for test. Leap,
Reptile, FOMAML and MAML meta-train Conv4 on 1, 3, 5, 10, 15, 20 and 25 alphabets (the
``leap-omniglot`` preset: full-batch inner gradient descent, lr 0.1, outer SGD 0.1), and every
initialisation, with a randomly initialised network (no meta-training), then learns each held-out
task by 100 steps of SGD (lr 0.1, mini-batches of 20 of its 300 training images, reshuffled every
epoch; the 10 tasks vectorised with ``vmap``). Scored: the area under the training curve (the
mini-batch training loss at each step, trapezoid rule, divided by the number of steps) and the
final error on the 100 held-out drawings, mean ± 95% CI over the 10 held-out tasks (one seed) or
over the seeds; and each AUC minus the randomly initialised network's on the same tasks and
mini-batches (paired, so that the tasks' differences in difficulty cancel).

CPU budget. The paper takes 100 inner steps, 1,000 meta-steps and 10 seeds; here every
meta-training run has 5 inner steps (the paper's MAML is unrolled for 5), a meta-batch of
``min(alphabets, 5)`` and the same wall-clock time, ``--budget-minutes M`` per run (default 2;
its outer steps planned from the measured step time, as in ``omniglot-table``), or ``--steps N``
meta-steps; ``--seeds S`` seeds (default 1). Runs are ordinary run folders under
``OUT/cells/leap-omniglot`` (resumable). ``--cells`` trains only the runs it names (``5/Leap``,
an alphabet count ``5`` or an algorithm ``Leap``); the other finished runs are still reused and
reported, and the no-meta-training baseline is always scored::

    metagrad experiment leap-omniglot --budget-minutes 2          # about an hour on 2 cores
    metagrad experiment leap-omniglot --steps 20 --seeds 3 --cells Leap  # docs/RESULTS.md 5
    metagrad experiment leap-omniglot --steps 1000 --seeds 10 --device cuda
    metagrad experiment leap-omniglot --quick
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metagrad import autodiff
from metagrad._types import Batch, Params, Task
from metagrad.experiments._cells import (
    diverged_notes,
    finished,
    load_json,
    machine,
    reject,
    run_or_note,
    save_figure,
    save_json,
    select_cells,
)
from metagrad.experiments._report import Options, Report, Table
from metagrad.experiments.omniglot_table import planned, train_seconds
from metagrad.models import Loss, loss_fn
from metagrad.tasks import to_device
from metagrad.training import (
    Config,
    build_estimator,
    build_model,
    data_root,
    load_run,
    mean_ci,
    preset,
    task_source,
    torch_settings,
)
from metagrad.training.config import DataConfig

DESCRIPTION = (
    "Leap Fig. 3: Omniglot alphabets as 20-way tasks; area under held-out training curves and "
    "final error against the number of meta-training alphabets"
)

ALGORITHMS = {"Leap": "leap", "Reptile": "reptile", "FOMAML": "fomaml", "MAML": "maml"}
BASELINE = "no meta-training"
ALPHABETS = (1, 25, 5, 15, 3, 10, 20)
"""Training alphabet counts, coarse to fine, so that a partial sweep already spans the range."""
FULL: dict[str, Any] = {
    "alphabets": ALPHABETS,
    "minutes": 2.0,
    "sgd_steps": 100,
    "inner_steps": 5,
    "batch": 5,
}
QUICK: dict[str, Any] = {
    "alphabets": (1, 3),
    "steps": 1,
    "sgd_steps": 5,
    "inner_steps": 1,
    "batch": 1,
}
SGD_LR, SGD_BATCH = 0.1, 20


def cell_config(
    algorithm: str, alphabets: int, seed: int = 0, device: str = "cpu", quick: bool = False
) -> Config:
    """The ``leap-omniglot`` preset on ``alphabets`` training alphabets, within a CPU budget."""
    budget = QUICK if quick else FULL
    return preset("leap-omniglot").override(
        algorithm=ALGORITHMS[algorithm],
        train_alphabets=alphabets,
        inner_steps=budget["inner_steps"],
        eval_inner_steps=0,  # the run's own test is the loss at theta; sgd_curves replaces it
        meta_batch=min(alphabets, budget["batch"]),
        seed=seed,
        device=device,
        eval_every=0,
        tensorboard=False,
    )


def sgd_curves(
    loss: Loss, theta: Params, tasks: Task, steps: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Train ``theta`` on every task (stacked on dim 0) by SGD; the curves and final errors.

    ``steps`` steps of size :data:`SGD_LR` on mini-batches of :data:`SGD_BATCH` support examples
    (a fresh permutation per epoch, per task, from ``seed``). Returns ``curve`` (steps, tasks),
    the mini-batch loss before each step; ``auc`` (tasks,), its trapezoid area over the steps
    divided by ``steps``; ``error`` (tasks,), the query error of the final parameters.
    """
    n_tasks, n = tasks.support.y.shape
    g = torch.Generator().manual_seed(seed)
    epochs = -(-steps * SGD_BATCH // n)
    order = torch.stack(
        [torch.cat([torch.randperm(n, generator=g) for _ in range(epochs)]) for _ in range(n_tasks)]
    )
    rows = torch.arange(n_tasks, device=tasks.support.y.device).unsqueeze(1)
    params = {k: v.detach().unsqueeze(0).repeat_interleave(n_tasks, 0) for k, v in theta.items()}
    with autodiff.use("func"):  # torch.func transforms of the model
        step = torch.func.vmap(torch.func.grad_and_value(loss))
        curve = []
        for s in range(steps):
            idx = order[:, s * SGD_BATCH : (s + 1) * SGD_BATCH].to(tasks.support.y.device)
            grads, value = step(
                params, Batch(tasks.support.x[rows, idx], tasks.support.y[rows, idx])
            )
            params = {k: p - SGD_LR * grads[k] for k, p in params.items()}
            curve.append(value)
        with torch.no_grad():
            accuracy = torch.func.vmap(loss.accuracy)(params, tasks.query)
    c = torch.stack(curve).double().cpu().numpy()
    auc = (c[1:] + c[:-1]).sum(0) / 2 / steps if steps > 1 else c.mean(0)
    return {"curve": c, "auc": auc, "error": 1 - accuracy.double().cpu().numpy()}


@functools.lru_cache(maxsize=1)
def _test_tasks(data: DataConfig) -> tuple[Task, list[str]]:
    """The 10 held-out alphabets' tasks and names (they do not depend on ``train_alphabets``)."""
    source = task_source(data)
    return source.fixed("test"), source.split_info["test"]  # type: ignore[index,return-value]


def _held_out(config: Config, params: Params, steps: int, path: Path) -> dict[str, Any]:
    """Score an initialisation on the held-out alphabets (saved as ``path``, reused)."""
    found = load_json(path)
    if found is not None and found["sgd_steps"] == steps:
        return found
    tasks, names = _test_tasks(dataclasses.replace(config.data, train_alphabets=1))
    device = next(iter(params.values())).device
    tasks = to_device(tasks, device)
    loss = loss_fn(build_model(config), "cross_entropy")
    with torch_settings(config):
        out = sgd_curves(loss, params, tasks, steps, config.run.seed)
    result = {
        "sgd_steps": steps,
        "test_alphabets": names,
        "curve": out["curve"].mean(1).tolist(),
        "auc": out["auc"].tolist(),
        "error": out["error"].tolist(),
    }
    save_json(path, result)
    return result


def _summary(per_seed: list[dict[str, Any]], key: str, scale: float = 1.0) -> tuple[float, float]:
    """Mean and 95% CI: over the held-out tasks (one seed) or over the seeds' means."""
    if len(per_seed) == 1:
        mean, ci = mean_ci(per_seed[0][key])
    else:
        mean, ci = mean_ci([float(np.mean(r[key])) for r in per_seed])
    return scale * mean, scale * ci


def _paired(
    per_seed: list[dict[str, Any]], base: list[dict[str, Any]], key: str
) -> tuple[float, float] | None:
    """Mean and 95% CI of ``key`` minus the baseline's on the same held-out tasks and seed: over
    the tasks (one seed) or over the seeds' mean differences; None unless every seed has both."""
    if len(per_seed) != len(base):
        return None
    diffs = [np.asarray(r[key]) - np.asarray(b[key]) for r, b in zip(per_seed, base, strict=True)]
    if len(diffs) == 1:
        return mean_ci(diffs[0].tolist())
    return mean_ci([float(d.mean()) for d in diffs])


def selected(
    cells: tuple[str, ...] | None, alphabets: tuple[int, ...] = ALPHABETS
) -> set[tuple[str, str]]:
    """The ``(alphabets, algorithm)`` runs that ``--cells`` asks to train (all without it): a
    run ``5/Leap``, an alphabet count ``5`` or an algorithm ``Leap``, case-insensitively."""
    counts = [str(n) for n in sorted(alphabets)]
    return select_cells(cells, counts, list(ALGORITHMS), ("alphabet count", "algorithm"))


def run(options: Options) -> Report:
    """Meta-train (or resume, or reuse) every run, score each on the held-out alphabets."""
    reject(options, "leap-omniglot", "lake_runs")
    start = time.perf_counter()
    budget = QUICK if options.quick else FULL
    minutes = options.budget_minutes
    steps = options.steps or budget.get("steps")
    if minutes is None and steps is None:
        minutes = budget["minutes"]
    seeds = list(range(options.seeds or 1))
    cells = Path(options.out) / "cells" / "leap-omniglot"
    changes = {"root": str(options.data)} if options.data is not None else {}
    scores: dict[str, dict[int, list]] = {}
    costs: dict[str, dict[int, str]] = {}
    failed: list[str] = []
    info = {
        "machine": machine(options.device),
        "budget_minutes": minutes,
        "steps": steps,
        "seeds": len(seeds),
        "sgd_steps": budget["sgd_steps"],
        "scores": scores,
    }
    for seed in seeds:
        base = cell_config("Leap", 1, seed, options.device, options.quick)
        base = data_root(base.override(**changes))
        torch.manual_seed(seed)  # the initialisation train() starts from with this seed
        model = build_model(base)
        init = build_estimator(base, model).init_meta(model)
        path = cells / f"{BASELINE.replace(' ', '-')}-seed{seed}.json"
        result = _held_out(base, init, budget["sgd_steps"], path)
        scores.setdefault(BASELINE, {}).setdefault(0, []).append(result)  # one per seed
    chosen = selected(options.cells, budget["alphabets"])
    for n in budget["alphabets"]:
        for name in ALGORITHMS:
            for seed in seeds:
                path = cells / f"{name}-{n}-alphabets-seed{seed}"
                if (str(n), name) not in chosen and not finished(path):
                    continue  # not asked for (--cells), and nothing of it to reuse
                config = cell_config(name, n, seed, options.device, options.quick)
                config = planned(data_root(config.override(**changes)), path, minutes, steps)
                if not run_or_note(config, path, failed):
                    continue
                params = load_run(path, options.device).params
                result = _held_out(config, params, budget["sgd_steps"], path / "held_out.json")
                scores.setdefault(name, {}).setdefault(n, []).append(result)
                cost = f"{config.optim.steps} / {train_seconds(path):.0f} s"
                mine = costs.setdefault(name, {})
                mine[n] = f"{mine[n]} + {cost}" if n in mine else cost
                info["wall_seconds"] = round(time.perf_counter() - start, 1)
                _report(options, info, costs, failed).save(options.out)  # partial, at once
    info["wall_seconds"] = round(time.perf_counter() - start, 1)
    return _report(options, info, costs, failed)


def _report(
    options: Options, info: dict[str, Any], costs: dict[str, dict[int, str]], failed: list[str]
) -> Report:
    """The AUC, final-error and budget tables and the figure, from the runs scored so far."""
    budget = QUICK if options.quick else FULL
    scores, steps, minutes = info["scores"], info["steps"], info["budget_minutes"]
    seeds = range(info["seeds"])
    what = f"{steps} meta-steps" if steps else f"{minutes:g} min of training"
    notes = [
        f"Meta-training: {what} per run, {budget['inner_steps']} inner steps, meta-batch "
        f"min(alphabets, {budget['batch']}), {len(seeds)} seed(s); the paper: 100 inner steps, "
        "1,000 meta-steps, 10 seeds.",
        f"Held out: 10 alphabets, {budget['sgd_steps']} SGD steps (lr {SGD_LR}, batch "
        f"{SGD_BATCH}); mean ± 95% CI over the "
        + ("held-out tasks." if len(seeds) == 1 else f"{len(seeds)} seeds."),
    ] + diverged_notes(failed)
    alphabets = sorted(budget["alphabets"])
    tables = []
    for key, title, scale, fmt in (
        ("auc", "Held-out training-loss AUC (lower is better)", 1.0, "{:.3f} ± {:.3f}"),
        ("error", "Held-out final test error (%)", 100.0, "{:.1f} ± {:.1f}"),
    ):
        columns = ["meta-training"] + [str(n) for n in alphabets]
        table = Table(f"leap_{key}", title, columns, notes=notes)
        for name in [*ALGORITHMS, BASELINE]:
            got = scores.get(name, {})
            if name == BASELINE and got:
                text = fmt.format(*_summary(got[0], key, scale))
                table.rows.append([name] + [text] * len(alphabets))
                continue
            table.rows.append(
                [name]
                + [
                    fmt.format(*_summary(got[n], key, scale)) if n in got else None
                    for n in alphabets
                ]
            )
        tables.append(table)
    paired = Table(
        "leap_auc_paired",
        f"Held-out AUC minus {BASELINE}'s on the same tasks (negative: learnt faster)",
        ["meta-training"] + [str(n) for n in alphabets],
        notes=[
            "Paired differences: the same 10 held-out tasks and SGD mini-batches for every "
            "initialisation, so the task-to-task spread of the AUC cancels; mean ± 95% CI over "
            + ("the tasks." if len(seeds) == 1 else f"the {len(seeds)} seeds.")
        ],
    )
    base = scores.get(BASELINE, {}).get(0, [])
    for name in ALGORITHMS:
        got = scores.get(name, {})
        cells = [_paired(got[n], base, "auc") if n in got else None for n in alphabets]
        paired.rows.append(
            [name] + [None if c is None else "{:+.3f} ± {:.3f}".format(*c) for c in cells]
        )
    tables.append(paired)
    cost = Table(
        "leap_budget",
        "Meta-training per run: outer steps / measured training seconds",
        ["algorithm"] + [str(n) for n in alphabets],
        [[name] + [costs.get(name, {}).get(n) for n in alphabets] for name in ALGORITHMS],
    )
    tables.append(cost)
    figures = _plots(scores, alphabets, Path(options.out)) if len(scores) > 1 else []
    return Report("leap-omniglot", tables, figures, info)


def _plots(scores: dict[str, dict[int, list]], alphabets: list[int], out: Path) -> list[Path]:
    """AUC against the number of meta-training alphabets, and the held-out learning curves."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    largest = max((n for name in ALGORITHMS for n in scores.get(name, {})), default=None)
    base = scores.get(BASELINE, {}).get(0, [])
    for i, name in enumerate([*ALGORITHMS, BASELINE]):
        got, color = scores.get(name, {}), "k" if name == BASELINE else f"C{i}"
        if name == BASELINE and got:
            left.axhline(0.0, color=color, ls="--", label=name)
        elif got:
            pairs = {n: _paired(got[n], base, "auc") for n in alphabets if n in got}
            ns = [n for n, p in pairs.items() if p is not None]
            if ns:
                means, cis = zip(*(pairs[n] for n in ns), strict=True)
                left.errorbar(ns, means, yerr=cis, color=color, marker="o", capsize=2, label=name)
        which = 0 if name == BASELINE else largest
        if got and which in got:
            curve = np.mean([r["curve"] for r in got[which]], axis=0)
            label = name if name == BASELINE else f"{name} ({which} alphabets)"
            right.plot(np.arange(len(curve)), curve, color=color, label=label)
    left.set(xlabel="meta-training alphabets", ylabel="AUC, minus the baseline's", xticks=alphabets)
    left.set_title("held-out alphabets: training-curve area, paired", fontsize="medium")
    right.set(xlabel="SGD step", ylabel="training loss (mini-batch)")
    right.set_title("held-out learning curves (mean over tasks)", fontsize="medium")
    left.legend(fontsize="x-small")
    right.legend(fontsize="x-small")
    return [save_figure(fig, out / "leap_omniglot.png")]
