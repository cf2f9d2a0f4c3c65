"""Lake et al.'s one-shot classification runs (Science 2015): within-alphabet 20-way 1-shot.

MAML (the ``omniglot-20w1s-maml`` preset) is meta-trained on 20-way 1-shot tasks of the ``lake``
split: the 30 background alphabets only (25 to train, 5 to validate; no rotations). It is then
scored two ways with its 5 test-time steps:

- Lake's 20 runs: each a 20-way problem inside one evaluation alphabet, one drawing per character
  to adapt on (one drawer) and another drawer's drawing of each to classify; the error rate over
  the 400 test items, beside the published human (4.5%) and Bayesian Program Learning (3.3%)
  rates. ``--lake-runs PATH`` takes the official ``all_runs.zip``; without it, 20 runs are built
  the same way from the evaluation alphabets (:func:`metagrad.data.make_lake_runs`, two runs per
  alphabet, seed 0) and the table says that these are ours, not the official ones.
- The usual across-alphabet 20-way 1-shot tasks (characters drawn from any of the 20 evaluation
  alphabets), 600 seeded tasks, to show how much harder the within-alphabet problem is.

Batch norm uses the statistics of the batch it normalises (transductive for the query set, as in
MAML's Omniglot protocol); Lake's models classify each test item on its own.

Budget: ``--budget-minutes M`` of training (default 15 on a CPU; steps planned from the measured
step time, as in ``omniglot-table``) or ``--steps N``; ``--seeds S`` runs under
``OUT/cells/lake-runs`` (resumable)::

    metagrad experiment lake-runs --budget-minutes 15
    metagrad experiment lake-runs --lake-runs all_runs.zip --steps 60000 --device cuda
    metagrad experiment lake-runs --quick
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from metagrad.data import LakeRuns, Omniglot, make_lake_runs
from metagrad.experiments._cells import load_json, machine, reject, run_cell, save_figure, save_json
from metagrad.experiments._report import Options, Report, Table
from metagrad.experiments.omniglot_table import planned, train_seconds
from metagrad.training import Config, data_root, load_run, mean_ci, preset, torch_settings

DESCRIPTION = (
    "Lake et al. 2015: error on the 20 within-alphabet one-shot runs beside human (4.5%) and BPL "
    "(3.3%), and across-alphabet 20-way 1-shot, after meta-training on background alphabets"
)

PRESET = "omniglot-20w1s-maml"
PUBLISHED = {
    "human": (4.5, "Lake, Salakhutdinov & Tenenbaum 2015 (Science), one-shot classification"),
    "Bayesian Program Learning": (3.3, "Lake, Salakhutdinov & Tenenbaum 2015 (Science), BPL"),
}
"""Published error rates (%) on the official 20 runs, with their source."""

FULL: dict[str, Any] = {"minutes": 15.0, "tasks": 600}
QUICK: dict[str, Any] = {"steps": 2, "tasks": 10, "meta_batch": 2}


def cell_config(seed: int = 0, device: str = "cpu") -> Config:
    """MAML 20-way 1-shot on the ``lake`` split (background alphabets), for an experiment, on
    every core (the preset's threads), as the table's cells: a cell is measured alone."""
    return preset(PRESET).override(
        split="lake", seed=seed, device=device, eval_every=0, tensorboard=False
    )


def lake_runs_path(options: Options, config: Config) -> tuple[Path, bool]:
    """The runs to score: ``--lake-runs``, else ours (built once into ``OUT``); official?"""
    if options.lake_runs is not None:
        LakeRuns(options.lake_runs)  # a bad path or file fails here, before any training
        return Path(options.lake_runs), True
    path = Path(options.out) / "cells" / "lake-runs" / "our_runs"
    if not path.exists():
        make_lake_runs(Omniglot(config.data.root), path, seed=0)  # type: ignore[arg-type]
    return path, False


def per_run_errors(path: Path, runs: Path) -> list[float]:
    """The error (%) of the run in ``path`` on each one-shot run, with its test-time steps."""
    run = load_run(path)
    with torch_settings(run.config):
        one_shot = LakeRuns(runs)
        errors = []
        for task in (one_shot[i] for i in range(len(one_shot))):
            phi = run.estimator.adapt(run.params, task.support)
            with torch.no_grad():
                errors.append(100 * (1 - float(run.estimator.loss.accuracy(phi, task.query))))
    return errors


def run(options: Options) -> Report:
    """Meta-train (or resume, or reuse) each seed's run, then score it on both problems."""
    start = time.perf_counter()
    reject(options, "lake-runs", "cells")
    budget = QUICK if options.quick else FULL
    steps = options.steps or budget.get("steps")
    minutes = options.budget_minutes
    if minutes is None and steps is None and options.device == "cpu":
        minutes = budget["minutes"]
    cells = Path(options.out) / "cells" / "lake-runs"
    changes: dict[str, Any] = {"eval_tasks": budget["tasks"]}
    if options.data is not None:
        changes["root"] = str(options.data)
    runs_path, official = (None, False)
    results: list[dict[str, Any]] = []
    for seed in range(options.seeds or 1):
        config = data_root(cell_config(seed, options.device).override(**changes))
        if options.quick:
            config = config.override(meta_batch=QUICK["meta_batch"])
        if runs_path is None:
            runs_path, official = lake_runs_path(options, config)
        path = cells / f"MAML-seed{seed}"
        config = planned(config, path, minutes, steps)
        if not run_cell(config, path):
            continue
        lake = load_json(path / "lake_runs.json")
        if lake is None or lake["runs"] != str(runs_path):
            lake = {"runs": str(runs_path), "errors": per_run_errors(path, runs_path)}
            save_json(path / "lake_runs.json", lake)
        errors = lake["errors"]
        test = load_json(path / "eval_test.json") or {}
        results.append(
            {
                "lake_error": mean_ci(errors)[0],
                "lake_ci": mean_ci(errors)[1],
                "lake_errors": errors,
                "across_error": 100 * (1 - test["accuracy"]),
                "across_ci": 100 * test["accuracy_ci"],
                "tasks": test["tasks"],
                "steps": config.optim.steps,
                "train_seconds": round(train_seconds(path), 1),
            }
        )
    info = {
        "machine": machine(options.device),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "budget_minutes": minutes,
        "steps": steps,
        "lake_runs": str(runs_path),
        "official_runs": official,
        "results": results,
    }
    figures = [_plot(results, Path(options.out) / "lake_runs.png")] if results else []
    return Report("lake-runs", [_table(results, official, minutes, steps, budget)], figures, info)


def _pair(results: list[dict[str, Any]], key: str) -> str | None:
    """``mean ± 95% CI`` (%): over the items or tasks (one seed) or over the seeds."""
    if not results:
        return None
    values = [r[f"{key}_error"] for r in results]
    mean, ci = (values[0], results[0][f"{key}_ci"]) if len(values) == 1 else mean_ci(values)
    return f"{mean:.1f} ± {ci:.1f}"


def _table(
    results: list[dict[str, Any]], official: bool, minutes: float | None, steps: int | None,
    budget: dict[str, Any],
) -> Table:  # fmt: skip
    which = "Lake's official 20 runs" if official else "our 20 runs (NOT the official ones)"
    table = Table(
        "lake_runs",
        "Error rate (%): within-alphabet one-shot runs and across-alphabet 20-way 1-shot",
        ["model", f"within-alphabet: {which}", "across-alphabet 20-way 1-shot"],
    )
    table.rows.append(["MAML, background alphabets only", _pair(results, "lake"), _pair(results,
                       "across")])  # fmt: skip
    for name, (error, _) in PUBLISHED.items():
        table.rows.append([f"{name} (Lake et al. 2015)", f"{error:.1f}", "not reported"])
    spent = ", ".join(f"{r['steps']} steps in {r['train_seconds']:.0f} s" for r in results)
    table.notes += [
        f"Training: {f'{steps} outer steps' if steps else f'{minutes:g} min'} per seed "
        f"({spent or 'none finished'}); {len(results)} seed(s); the MAML paper trains 60,000.",
        (
            "Within-alphabet: Lake's official all_runs.zip."
            if official
            else "Within-alphabet: "
            "20 runs built by metagrad.data.make_lake_runs from the evaluation alphabets (2 per "
            "alphabet, seed 0), in the official format; the published rates are on the official "
            "runs, so they are not the same test."
        ),  # fmt: skip
        f"Across-alphabet: {budget['tasks']} seeded tasks of the evaluation alphabets.",
        f"± is a 95% CI over the 20 runs (or the {budget['tasks']} tasks) with one seed, else "
        "over the seeds.",
    ] + [f"{name}: {src}" for name, (_, src) in PUBLISHED.items()]
    return table


def _plot(results: list[dict[str, Any]], path: Path) -> Path:
    """Error on each one-shot run (first seed), the across-alphabet error and the published."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    errors = results[0]["lake_errors"]
    ax.bar(range(1, len(errors) + 1), errors, color="C0", label="MAML, within-alphabet run")
    ax.axhline(results[0]["across_error"], color="C1", label="MAML, across-alphabet 20-way")
    for (name, (error, _)), style in zip(PUBLISHED.items(), ("--", ":"), strict=True):
        ax.axhline(error, color="k", ls=style, label=f"{name} (official runs)")
    ax.set(xlabel="one-shot run", ylabel="error rate (%)", ylim=(0, 100), xticks=range(1, 21))
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return save_figure(fig, path)
