"""The objects a config describes: the task source, the network, the inner solver, the estimator.

Each comes from its registry (``BENCHMARKS``, ``MODELS``, ``INNER_SOLVERS``, ``ALGORITHMS``),
with the config fields that the entry's ``options`` name; nothing here lists an algorithm.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from torch import nn

from metagrad._registry import Entry
from metagrad._types import Estimator, InnerSolver
from metagrad.algorithms import ALGORITHMS
from metagrad.data import BENCHMARKS, TaskSource
from metagrad.inner import INNER_SOLVERS
from metagrad.models import MODELS, loss_fn
from metagrad.training.config import Config, DataConfig

__all__ = [
    "build_estimator",
    "build_inner",
    "build_model",
    "data_root",
    "model_shape",
    "task_source",
]


def _fields(section: Any, entry: Entry[Any]) -> dict[str, Any]:
    """The builder's keywords: ``{keyword: section.<field>}`` for each of ``entry.options``."""
    missing = [name for name in entry.options.values() if not hasattr(section, name)]
    if missing:
        raise ValueError(
            f"{entry.name!r} reads the config fields {missing}, which {type(section).__name__} "
            "lacks: add them to metagrad/training/config.py"
        )
    return {keyword: getattr(section, name) for keyword, name in entry.options.items()}


def data_root(config: Config) -> Config:
    """``config`` with the data folder resolved: ``--data``, else the benchmark's variable.

    For Omniglot the variable is ``$METAGRAD_OMNIGLOT`` (the ``root_env`` of its entry).
    """
    root = _root(config.data)
    return config if root == config.data.root else config.override(root=root)


def _root(data: DataConfig) -> str | None:
    entry = BENCHMARKS[data.benchmark]
    env = entry.extra.get("root_env")
    if env is None or data.root is not None:
        return data.root
    root = os.environ.get(env)
    if not root:
        what = entry.extra.get("root_help") or "its data folder"
        raise ValueError(f"{entry.name} needs its data: pass --data PATH ({what}) or set {env}")
    return root


def task_source(data: DataConfig) -> TaskSource:
    """The tasks of ``data``'s benchmark (its folder resolved first, see :func:`data_root`)."""
    entry = BENCHMARKS[data.benchmark]
    data = dataclasses.replace(data, root=_root(data))
    return entry.build(**_fields(data, entry))


def model_shape(data: DataConfig) -> dict[str, int]:
    """What the network takes and gives for ``data``'s benchmark: ``in_channels``, ``image_size``
    and ``n_way`` (``ways`` for a classifier, 1 output for regression)."""
    extra = BENCHMARKS[data.benchmark].extra
    classifier = extra["loss"] == "cross_entropy"
    return {
        "in_channels": int(extra.get("in_channels", 1)),
        "image_size": int(extra.get("image_size", 1)),
        "n_way": data.ways if classifier else 1,
    }


def build_model(config: Config) -> nn.Module:
    """The network ``config.model.arch`` from ``MODELS``, shaped for the benchmark."""
    return MODELS.build(config.model.arch, **model_shape(config.data))


def build_inner(config: Config, *, evaluation: bool = False) -> InnerSolver:
    """The inner solver ``config.algo.inner``; ``evaluation=True``: with the test-time steps."""
    a = config.algo
    steps = a.eval_inner_steps if evaluation and a.eval_inner_steps is not None else a.inner_steps
    entry = INNER_SOLVERS[a.inner]
    options = _fields(a, entry)
    if evaluation and a.eval_inner_batch_size is not None and "batch_size" in options:
        options["batch_size"] = a.eval_inner_batch_size
    return entry.build(steps=steps, **options)


def build_estimator(config: Config, model: nn.Module, *, evaluation: bool = False) -> Estimator:
    """The estimator of ``config.algo`` for ``model``; ``evaluation=True``: test-time steps."""
    entry = ALGORITHMS[config.algo.algorithm]
    loss = loss_fn(model, BENCHMARKS[config.data.benchmark].extra["loss"])
    inner = build_inner(config, evaluation=evaluation)
    return entry.build(loss, inner, **_fields(config.algo, entry))
