"""The published experiments, one module each: ``metagrad experiment NAME``.

Each module defines ``DESCRIPTION`` (one line, with the paper and figure or table it reproduces)
and ``run(options: Options) -> Report``. :func:`run_experiment` saves the report's tables (Markdown
and JSON) and figures into ``options.out`` and prints the tables. ``--quick`` is a smoke version
(under about 2 minutes on 2 cores); the full version is what ``docs/RESULTS.md`` reports.
Long experiments are made of ordinary resumable runs under ``options.out``, so that a table is
assembled from whichever cells have finished (missing cells marked) and completed later.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from metagrad.experiments._report import MISSING, Options, Report, Table

__all__ = ["EXPERIMENTS", "MISSING", "Options", "Report", "Table", "run_experiment"]

EXPERIMENTS: dict[str, str] = {
    "sinusoid": "metagrad.experiments.sinusoid",
    "metagrad-accuracy": "metagrad.experiments.metagrad_accuracy",
    "compute-memory": "metagrad.experiments.compute_memory",
    "omniglot-table": "metagrad.experiments.omniglot_table",
    "leap-omniglot": "metagrad.experiments.leap_omniglot",
    "lake-runs": "metagrad.experiments.lake_runs",
    "complexity": "metagrad.experiments.complexity",
    "hypergradients": "metagrad.experiments.hypergradients",
    "uncertainty": "metagrad.experiments.uncertainty",
}
"""Experiment name -> the module that runs it."""


def describe(name: str) -> str:
    """The experiment's one-line description."""
    return importlib.import_module(EXPERIMENTS[name]).DESCRIPTION


def run_experiment(name: str, options: Options) -> Report:
    """Run experiment ``name``, save its tables and figures into ``options.out``, print tables."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}: choose one of {sorted(EXPERIMENTS)}")
    Path(options.out).mkdir(parents=True, exist_ok=True)
    report = importlib.import_module(EXPERIMENTS[name]).run(options)
    report.save(options.out)
    print(report.to_markdown())
    return report
