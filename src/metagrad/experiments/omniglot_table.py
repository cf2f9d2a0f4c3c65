"""Omniglot few-shot classification at equal compute (Rajeswaran et al. 2019, iMAML Table 2).

MAML, FOMAML, Reptile, iMAML-GD, iMAML-HF, ANIL, Leap and Meta-SGD, each with its ``omniglot-*``
preset, on 5-way 1-shot, 5-way 5-shot, 20-way 1-shot and 20-way 5-shot (the ``maml`` split: 1,200
training characters with rotations, 423 test characters), scored on the same 600 seeded test tasks
with the preset's test-time steps: mean accuracy with a 95% confidence interval, beside the
published numbers (:data:`PUBLISHED`, each with its source).

Budget. ``--budget-minutes M`` (default 15 on a CPU) gives every cell the same wall-clock time:
the cell's outer-step count is planned from its own measured step time (the median of three full
meta-batches after a warm-up, :func:`step_seconds`), so that training takes about ``M`` minutes; a
linear schedule (Reptile) then anneals over exactly that many steps. The steps and the measured
training seconds of every cell are reported beside the accuracies. ``--steps N`` trains every cell
``N`` outer steps instead; on a GPU with neither flag each preset keeps its paper's iteration count.
Training uses every core torch is given: measure alone, one experiment at a time, since a cell's
result depends only on its outer steps but its seconds depend on what else runs. Each new cell
first measures its step time (:func:`step_seconds`) and saves it beside its folder
(``ALGO-seedS.plan.json``) with the load average; the learning curves put validation accuracy
(200 tasks, ten times per cell) against outer steps and against steps times that quiet step time,
so other load cannot distort them.

Every cell is an ordinary run folder ``OUT/cells/omniglot-table/{5w1s,...}/ALGO-seedS``: calling
the experiment again completes the cells that had not finished and reuses the others; the table
is rewritten after every cell, with unfinished ones marked. Cells run one setting at a time, the
cheapest first (5w1s, 5w5s, 20w1s, 20w5s)::

    metagrad experiment omniglot-table --budget-minutes 15          # about 7 hours of training
    metagrad experiment omniglot-table --device cuda --steps 60000
    metagrad experiment omniglot-table --quick                      # 5-way 1-shot, a few steps
    metagrad experiment omniglot-table --budget-minutes 50 --cells 5w1s/iMAML-HF,20w1s/MAML

``--cells`` trains only the cells it names (a cell ``5w1s/iMAML-HF``, a whole setting ``20w1s``
or a whole row ``MAML``); the other finished cells are still reused and reported, the unfinished
ones left as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from metagrad.algorithms import meta_gradient
from metagrad.data import TaskSource
from metagrad.experiments._cells import (
    diverged_notes,
    finished,
    load_json,
    machine,
    reject,
    run_cell,
    save_figure,
    save_json,
    select_cells,
)
from metagrad.experiments._report import Options, Report, Table
from metagrad.tasks import to_device
from metagrad.training import (
    Config,
    RunDir,
    TrainingError,
    build_estimator,
    build_model,
    data_root,
    mean_ci,
    preset,
    task_source,
    torch_settings,
)
from metagrad.training.config import DataConfig
from metagrad.training.run import CONFIG

DESCRIPTION = (
    "iMAML Table 2: Omniglot 5/20-way 1/5-shot test accuracy of eight meta-learners at equal "
    "wall-clock budget, beside the published numbers"
)

SETTINGS = ((5, 1), (5, 5), (20, 1), (20, 5))
ALGORITHMS = {
    "MAML": "maml",
    "FOMAML": "fomaml",
    "Reptile": "reptile-carried",
    "iMAML-GD": "imaml-gd-released",
    "iMAML-HF": "imaml-hf",
    "ANIL": "anil",
    "Leap": "leap",
    "Meta-SGD": "metasgd",
}
"""Row name -> the ``omniglot-{W}w{K}s-*`` preset (Leap has none: see :func:`cell_config`). New
rows go last: a setting's cells train in this order, so the finished ones keep their place.
Reptile runs its inner Adam as the released code does, its state carried from task to task: with
the moments reset for every task it reached 82.23% at 5-way 1-shot (the cell kept under
``superseded/``). iMAML-GD runs the released code's loop (plain inner steps, one pull-back step,
the outer Adam's eps 1e-3): with the paper's proximal solve it reached 57.80% (also kept)."""

_MAML = "Finn et al. 2017 (MAML), Table 1"
_REPTILE = "Nichol et al. 2018 (Reptile), Table 1, with transduction, as quoted in iMAML Table 2"
_IMAML = "Rajeswaran et al. 2019 (iMAML), Table 2"
PUBLISHED: dict[str, tuple[dict[tuple[int, int], float], str, bool]] = {
    "MAML": ({(5, 1): 98.7, (5, 5): 99.9, (20, 1): 95.8, (20, 5): 98.9}, _MAML, True),
    "FOMAML": ({(5, 1): 98.3, (5, 5): 99.2, (20, 1): 89.4, (20, 5): 97.9}, _MAML, True),
    "Reptile": ({(5, 1): 97.68, (5, 5): 99.48, (20, 1): 89.43, (20, 5): 97.12}, _REPTILE, True),
    "iMAML-GD": ({(5, 1): 99.16, (20, 1): 94.46}, f"{_IMAML} (5-shot entries not quoted)", True),
    "iMAML-HF": ({(5, 1): 99.50, (5, 5): 99.74, (20, 1): 96.18, (20, 5): 99.14}, _IMAML, True),
    "Meta-SGD": (
        {(5, 1): 99.53, (5, 5): 99.93, (20, 1): 95.93, (20, 5): 98.97},
        "Li et al. 2017 (Meta-SGD), Table 1, from memory: uncertain, check before quoting",
        False,
    ),
    "ANIL": (
        {(20, 1): 96.2, (20, 5): 98.0},
        "Raghu et al. 2020 (ANIL), Table 2, from memory: uncertain, check before quoting",
        False,
    ),
}
"""Published test accuracy (%) -> (numbers by (ways, shots), source, sure). Leap reports none."""

QUICK: dict[str, Any] = {
    "minutes": 0.02, "tasks": 5, "val_tasks": 3, "meta_batch": 4, "settings": ((5, 1),)
}  # fmt: skip
FULL: dict[str, Any] = {"minutes": 15.0, "tasks": 600, "val_tasks": 200}
PLAN = ".plan.json"
"""Suffix of a cell's plan, ``ALGO-seedS.plan.json`` beside its run folder: its measured step time
and the load average around it, saved before it trains."""
CURVE_POINTS = 10
"""Validations per cell: the points of its learning curve."""
VMAP = ("MAML", "FOMAML", "ANIL", "iMAML-GD")
"""Cells that may train with ``mode="vmap"`` on a CPU (the same meta-gradient as the thread loop:
the tests hold the two to 1e-10). A new cell's plan times both modes and trains with the faster
(:func:`record_plan`): on 5-way 1-shot tasks of 10 images vmap is the faster, on larger tasks
the loop, by 2.6 to 7.8 times for MAML (docs/PERFORMANCE.md section 10)."""


def cell_config(name: str, ways: int, shots: int, seed: int = 0, device: str = "cpu") -> Config:
    """The run of one cell: its preset with evaluation, logging and threads for an experiment.

    Leap has no few-shot preset (its paper reports no such table): MAML's settings for the same
    ``ways`` and ``shots``, with MAML's test-time step count (3 or 5) as its training path length.
    """
    if name == "Leap":
        base = preset(f"omniglot-{ways}w{shots}s-maml")
        steps = base.algo.eval_inner_steps
        config = base.override(algorithm="leap", inner_steps=steps, eval_inner_steps=steps)
        config = dataclasses.replace(config, preset=f"omniglot-{ways}w{shots}s-maml, as Leap")
    else:
        config = preset(f"omniglot-{ways}w{shots}s-{ALGORITHMS[name]}")
    return config.override(
        seed=seed, device=device, eval_every=0, tensorboard=False, eval_tasks=600
    )


def modes(name: str, device: str) -> tuple[str, ...]:
    """The batching modes a new cell's plan times, the faster to train with."""
    return ("loop", "vmap") if device == "cpu" and name in VMAP else ("loop",)


def step_seconds(config: Config, repeats: int = 7) -> float:
    """Seconds per outer step of ``config`` in its batching mode (see :func:`mode_seconds`)."""
    return mode_seconds(config, (config.algo.mode,), repeats)[config.algo.mode]


def mode_seconds(config: Config, modes: tuple[str, ...], repeats: int = 7) -> dict[str, float]:
    """Seconds per outer step of ``config`` in each batching mode of ``modes``: the median of
    ``repeats`` rounds, each sampling a meta-batch and computing its full meta-gradient once in
    every mode (in turn, the first mode rotating), after a warm-up round (a sample of two tasks
    scaled up overestimated a MAML step 2.4-fold: the first calls on a new shape and the idle
    worker threads dominate it; three rounds left the choice of mode to noise)."""
    config = data_root(config)
    source = _source(config.data)
    device = torch.device(config.run.device)
    model = build_model(config).to(device)
    estimator = build_estimator(config, model)
    theta = estimator.init_meta(model)
    g = torch.Generator().manual_seed(config.run.seed)
    elapsed: dict[str, list[float]] = {mode: [] for mode in modes}
    with torch_settings(config):
        for r in range(1 + repeats):
            for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
                start = time.perf_counter()
                batch = to_device(source.sample("train", config.optim.meta_batch, g), device)
                meta_gradient(estimator, theta, batch, mode=mode)  # type: ignore[arg-type]
                elapsed[mode].append(time.perf_counter() - start)
    return {mode: statistics.median(times[1:]) for mode, times in elapsed.items()}


@functools.lru_cache(maxsize=2)
def _source(data: DataConfig) -> TaskSource:
    return task_source(data)


def planned(config: Config, path: Path, minutes: float | None, steps: int | None) -> Config:
    """``config`` with its outer steps fixed, and logging and checkpoints to match.

    ``steps`` if given; else those of the run already in ``path`` (a plan is made once); else
    ``minutes`` of training at the measured :func:`step_seconds`; else the preset's.
    """
    if steps is None and (path / CONFIG).is_file():
        steps = RunDir(path).config().optim.steps
    if steps is None and minutes is not None:
        plan = load_json(plan_path(path))
        seconds = plan["step_seconds"] if plan else step_seconds(config)
        steps = max(1, int(60 * minutes / seconds))
    steps = steps or config.optim.steps
    return config.override(
        steps=steps,
        log_every=max(1, min(100, steps // 50)),
        checkpoint_every=max(1, steps // 5),
        eval_every=max(1, steps // CURVE_POINTS),
    )


def plan_path(path: Path) -> Path:
    """Where the plan of the cell in ``path`` is kept (beside it: the run folder starts empty)."""
    return path.with_name(path.name + PLAN)


def record_plan(config: Config, path: Path, choices: tuple[str, ...] = ("loop",)) -> None:
    """Measure a new cell's step time once in each batching mode of ``choices`` and save the
    faster, its mode and the load average (``plan.json``)."""
    if (path / CONFIG).is_file() or plan_path(path).is_file():
        return
    load = os.getloadavg()
    seconds = mode_seconds(config, choices)
    mode = min(seconds, key=lambda m: seconds[m])
    save_json(
        plan_path(path),
        {
            "step_seconds": seconds[mode],
            "mode": mode,
            "mode_step_seconds": seconds,
            "threads": config.run.threads or torch.get_num_threads(),
            "load_average_before": list(load),
            "load_average_after": list(os.getloadavg()),
        },
    )


def plan_mode(path: Path, name: str, device: str) -> str:
    """The batching mode the cell in ``path`` trains with: its plan's choice. A plan saved
    before plans chose (no ``mode``) trained with ``vmap`` where :data:`VMAP` names the cell."""
    plan = load_json(plan_path(path)) or {}
    if "mode" in plan:
        return str(plan["mode"])
    return "vmap" if device == "cpu" and name in VMAP else "loop"


def curve(path: Path) -> list[tuple[int, float]]:
    """``(outer step, validation accuracy %)`` of the run in ``path``, in order."""
    return [
        (m["step"], 100 * m["val_accuracy"]) for m in RunDir(path).metrics() if "val_accuracy" in m
    ]


def train_seconds(path: Path) -> float:
    """The training time of the run in ``path``: the log windows' steps over their speed."""
    total, last = 0.0, 0
    for m in RunDir(path).metrics():
        if "steps_per_s" in m:
            total += (m["step"] - last) / m["steps_per_s"]
            last = m["step"]
    return total


def cell_result(path: Path) -> dict[str, Any] | None:
    """Accuracy (%), its 95% half-width, steps and training seconds of a finished cell."""
    ev = load_json(path / "eval_test.json")
    if ev is None:
        return None
    plan = load_json(plan_path(path)) or {}
    config = RunDir(path).config()
    return {
        "accuracy": 100 * ev["accuracy"],
        "ci": 100 * ev["accuracy_ci"],
        "tasks": ev["tasks"],
        "preset": config.preset,
        "mode": config.algo.mode,
        "seed": config.run.seed,
        "steps": config.optim.steps,
        "train_seconds": round(train_seconds(path), 1),
        "step_seconds": plan.get("step_seconds"),
        "load_average": plan.get("load_average_before"),
        "curve": curve(path),
    }


def _summary(per_seed: list[dict[str, Any]]) -> str:
    """``mean ± 95% CI``: over the test tasks (one seed) or over the seeds' means."""
    accs = [r["accuracy"] for r in per_seed]
    mean, ci = (accs[0], per_seed[0]["ci"]) if len(accs) == 1 else mean_ci(accs)
    return f"{mean:.2f} ± {ci:.2f}"


def _paper(name: str, setting: tuple[int, int]) -> str:
    numbers, _, sure = PUBLISHED.get(name, ({}, "", True))
    value = numbers.get(setting)
    return "not reported" if value is None else f"{value:.2f}" + ("" if sure else " (?)")


def _key(ways: int, shots: int) -> str:
    return f"{ways}w{shots}s"


def report(options: Options, results: dict[str, dict[str, list]], info: dict[str, Any]) -> Report:
    """The accuracy table beside the papers, the budget table, and the figure."""
    settings = [_key(w, s) for w, s in SETTINGS]
    acc = Table(
        "omniglot_table",
        "Omniglot test accuracy (%), mean ± 95% CI, beside the published numbers",
        ["algorithm"] + [f"{s} {k}" for s in settings for k in ("ours", "paper")],
        notes=[info["budget"], info["protocol"]]
        + diverged_notes(info.get("failed", []))
        + [f"{n}: {src}" + ("" if sure else " (?)") for n, (_, src, sure) in PUBLISHED.items()]
        + ["Leap: no few-shot Omniglot numbers published; run with MAML's settings (assumed)."],
    )
    cost = Table(
        "omniglot_budget",
        "Training per cell: outer steps / measured training seconds",
        ["algorithm"] + settings,
        notes=["Training seconds from the run's own log (steps over steps per second)."],
    )
    each = Table(
        "omniglot_cells",
        "Every finished cell: its preset, budget and the load average when its plan was measured",
        [
            "setting",
            "algorithm",
            "seed",
            "preset",
            "mode",
            "outer steps",
            "planned s/step",
            "planned min",
            "training s",
            "load average",
            "test accuracy (%)",
            "paper",
        ],
        notes=[
            "Planned s/step: the median of seven rounds of a full meta-batch measured before the "
            "cell trained (three rounds, one mode, for cells planned before 2026-12-02 07:15); "
            "planned min: outer steps times planned s/step, the cell's budget; load average: "
            "the 1-minute load average then (2 cores); training seconds include the ten "
            "validations."
        ],
    )
    for (w, s), key in zip(SETTINGS, settings, strict=True):
        for name in ALGORITHMS:
            for c in results.get(key, {}).get(name, []):
                load = c.get("load_average")
                each.rows.append(
                    [
                        key,
                        name,
                        c.get("seed", 0),
                        c.get("preset"),
                        c.get("mode"),
                        c["steps"],
                        None if c.get("step_seconds") is None else f"{c['step_seconds']:.3f}",
                        None
                        if c.get("step_seconds") is None
                        else f"{c['steps'] * c['step_seconds'] / 60:.0f}",
                        f"{c['train_seconds']:.0f}",
                        None if not load else f"{load[0]:.2f}",
                        f"{c['accuracy']:.2f} ± {c['ci']:.2f}",
                        _paper(name, (w, s)),
                    ]
                )
    for name in ALGORITHMS:
        row: list[str | None] = [name]
        costs: list[str | None] = [name]
        for (w, s), key in zip(SETTINGS, settings, strict=True):
            cells = results.get(key, {}).get(name)
            row += [_summary(cells) if cells else None, _paper(name, (w, s))]
            costs.append(
                " + ".join(f"{c['steps']} / {c['train_seconds']:.0f} s" for c in cells)
                if cells
                else None
            )
        acc.rows.append(row)
        cost.rows.append(costs)
    figures = []
    if results:
        figures.append(_plot(results, Path(options.out) / "omniglot_table.png"))
        figures.append(_curves(results, Path(options.out) / "omniglot_curves.png"))
    return Report("omniglot-table", [acc, cost, each], figures, {**info, "results": results})


def selected(cells: tuple[str, ...] | None) -> set[tuple[str, str]]:
    """The ``(setting, algorithm)`` cells that ``--cells`` asks to train (all without it).

    Each entry names a cell (``5w1s/iMAML-HF``), a setting (``20w1s``) or an algorithm (``MAML``),
    case-insensitively; ``ValueError`` names the valid ones for anything else.
    """
    keys = [_key(w, s) for w, s in SETTINGS]
    return select_cells(cells, keys, list(ALGORITHMS), ("setting", "algorithm"))


def run(options: Options) -> Report:
    """Train (or resume, or reuse) every cell, one setting at a time; the table after each."""
    reject(options, "omniglot-table", "lake_runs")
    start = time.perf_counter()
    budget = QUICK if options.quick else FULL
    minutes = options.budget_minutes
    if minutes is None and options.steps is None and options.device == "cpu":
        minutes = budget["minutes"]
    seeds = list(range(options.seeds or 1))
    cells = Path(options.out) / "cells" / "omniglot-table"
    what = f"{minutes:g} min of training per cell" if minutes else "the preset's outer steps"
    info: dict[str, Any] = {
        "machine": machine(options.device),
        "budget_minutes": minutes,
        "steps": options.steps,
        "seeds": len(seeds),
        "budget": (
            f"Budget: {options.steps} outer steps per cell"
            if options.steps
            else f"Budget: {what} (outer steps planned from the cell's measured step time)"
        )
        + " for the cells this run plans (a finished cell keeps its own plan: 'planned min' in "
        "the cells table)"
        + f", {len(seeds)} seed(s); the papers train 60,000-200,000 outer steps on a GPU.",
        "protocol": (
            f"Test: {budget['tasks']} fixed tasks of the 423 test characters, the preset's "
            "test-time steps; batch norm on the batch's statistics (transductive, as the papers)."
            + (f" Quick: meta-batch {QUICK['meta_batch']}." if options.quick else "")
        ),
    }
    chosen = selected(options.cells)
    results: dict[str, dict[str, list]] = {}
    for ways, shots in budget.get("settings", SETTINGS):
        for name in ALGORITHMS:
            for seed in seeds:
                path = cells / _key(ways, shots) / f"{name}-seed{seed}"
                if (_key(ways, shots), name) not in chosen and not finished(path):
                    continue  # not asked for (--cells), and nothing of it to reuse
                config = cell_config(name, ways, shots, seed, options.device)
                changes: dict[str, Any] = {"eval_tasks": budget["tasks"]}
                if options.data is not None:
                    changes["root"] = str(options.data)
                if options.quick:
                    changes["meta_batch"] = min(config.optim.meta_batch, QUICK["meta_batch"])
                config = data_root(config.override(**changes))
                config = config.override(val_tasks=budget["val_tasks"])
                record_plan(config, path, modes(name, options.device))
                config = config.override(mode=plan_mode(path, name, options.device))
                config = planned(config, path, minutes, options.steps)
                try:
                    done = run_cell(config, path)
                except TrainingError as e:  # a diverged cell stays missing, with the reason
                    info.setdefault("failed", []).append(f"{path.relative_to(cells)}: {e}")
                    continue
                if done and (result := cell_result(path)):
                    results.setdefault(_key(ways, shots), {}).setdefault(name, []).append(result)
                info["wall_seconds"] = round(time.perf_counter() - start, 1)
                report(options, results, info).save(options.out)  # a partial table, at once
    return report(options, results, info)


def _plot(results: dict[str, dict[str, list]], path: Path) -> Path:
    """One panel per setting: accuracy and 95% CI per algorithm, the paper's number as a bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    names = list(ALGORITHMS)
    for i, (w, s) in enumerate(SETTINGS):
        ax = fig.add_subplot(1, len(SETTINGS), i + 1)
        got = results.get(_key(w, s), {})
        for j, name in enumerate(names):
            if got.get(name):
                accs = [r["accuracy"] for r in got[name]]
                mean = sum(accs) / len(accs)
                ci = got[name][0]["ci"] if len(accs) == 1 else mean_ci(accs)[1]
                ax.bar(j, mean, yerr=ci, color=f"C{j}", capsize=2)
            paper = PUBLISHED.get(name, ({}, "", True))[0].get((w, s))
            if paper is not None:
                ax.plot([j - 0.4, j + 0.4], [paper, paper], "k-", lw=2)
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize="small")
        ax.set(ylim=(0, 100), title=f"{w}-way {s}-shot (black: paper)")
        if i == 0:
            ax.set_ylabel("test accuracy (%)")
    return save_figure(fig, path)


def _curves(results: dict[str, dict[str, list]], path: Path) -> Path:
    """Validation accuracy against outer steps and against training seconds, one row per
    setting with results; seconds are steps times the cell's quiet step time (``plan.json``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    settings = [(w, s) for w, s in SETTINGS if results.get(_key(w, s))]
    fig = Figure(figsize=(10, 3.2 * len(settings)), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (w, s) in enumerate(settings):
        by_steps = fig.add_subplot(len(settings), 2, 2 * i + 1)
        by_time = fig.add_subplot(len(settings), 2, 2 * i + 2, sharey=by_steps)
        for j, name in enumerate(ALGORITHMS):
            for r in results[_key(w, s)].get(name, []):
                if not r.get("curve"):
                    continue
                steps, acc = zip(*r["curve"], strict=True)
                by_steps.plot(steps, acc, "o-", color=f"C{j}", ms=3, label=name)
                if r.get("step_seconds"):
                    minutes = [k * r["step_seconds"] / 60 for k in steps]
                    by_time.plot(minutes, acc, "o-", color=f"C{j}", ms=3, label=name)
        by_steps.set(xlabel="outer steps", ylabel="validation accuracy (%)")
        by_steps.set_title(f"{w}-way {s}-shot", fontsize="medium")
        by_time.set(xlabel="training minutes (steps x quiet step time)")
        by_steps.legend(fontsize="small")
    return save_figure(fig, path)
