"""The one seam for distribution: a :class:`Reducer` sees each whole meta-batch and each whole
set of evaluation tasks.

The outer loop asks its reducer for the mean meta-gradient of the global meta-batch, and
evaluation asks it for the scores of all evaluation tasks. :class:`Local` computes them in this
process; the reducer of :mod:`metagrad.training.distributed` computes its rank's share and
all-reduces, so the loop is the same in one process and under ``torchrun``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, cast

from torch import Tensor

from metagrad._types import Estimator, Metrics, Params, Task
from metagrad.algorithms import meta_gradient
from metagrad.algorithms.batching import Mode

__all__ = ["SCORES", "Local", "Reducer", "ScoreFn"]

SCORES = ("loss_before", "loss", "accuracy", "nll", "calibration", "cov50", "cov90", "cov95")
"""The columns of an evaluation task's scores (the last five only for an estimator with a
posterior; 0 otherwise)."""

ScoreFn = Callable[[Task], Tensor]
"""``score(tasks) -> [n, len(SCORES)]``: the :data:`SCORES` of each of ``n`` tasks."""


class Reducer(Protocol):
    """Where the tasks of a meta-batch or of an evaluation are computed, and how they are joined.

    ``is_main``: whether this process writes the run folder and prints (rank 0, or the only
    process).
    """

    is_main: bool

    def meta_gradient(
        self, estimator: Estimator, theta: Params, tasks: Task, mode: str
    ) -> tuple[Params, Metrics]:
        """The mean meta-gradient and mean metrics over all of ``tasks`` (tasks on dim 0).

        ``mode`` is a batching mode of :func:`~metagrad.meta_gradient` (``"loop"``, ``"vmap"``).
        """
        ...

    def score(self, score: ScoreFn, tasks: Task) -> Tensor:
        """The ``[n, len(SCORES)]`` scores of all ``n`` ``tasks``; ``score`` scores any subset."""
        ...

    def any_stop(self, requested: bool) -> bool:
        """Whether any process was asked to stop (a signal): all of them stop at the same step."""
        ...


class Local:
    """Everything in this process: :func:`~metagrad.meta_gradient`, and every task scored here."""

    is_main = True

    def meta_gradient(
        self, estimator: Estimator, theta: Params, tasks: Task, mode: str
    ) -> tuple[Params, Metrics]:
        return meta_gradient(estimator, theta, tasks, mode=cast(Mode, mode))

    def score(self, score: ScoreFn, tasks: Task) -> Tensor:
        return score(tasks)

    def any_stop(self, requested: bool) -> bool:
        return requested
