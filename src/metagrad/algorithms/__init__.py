"""The estimators, their registry, and batching over a batch of tasks.

``meta_gradient(estimator, theta, tasks)`` averages the per-task meta-gradient over the tasks on
dim 0 of ``tasks``: ``mode="loop"`` runs one task at a time on plain autograd (on a CPU the faster
and far leaner mode, see ``benchmarks/bench_meta.py`` and ``docs/PERFORMANCE.md``);
``mode="vmap"`` vectorises the tasks with ``torch.func.vmap``, in chunks of ``chunk`` tasks when
given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from metagrad import _fast, tree
from metagrad._types import InnerSolver, LossFn, Metrics, Params, Task
from metagrad.algorithms._base import Estimator, check_finite, check_task
from metagrad.algorithms.imaml import IMAML
from metagrad.algorithms.leap import Leap
from metagrad.algorithms.maml import ANIL, MAML
from metagrad.algorithms.reptile import Reptile

__all__ = [
    "ALGORITHMS",
    "ANIL",
    "IMAML",
    "MAML",
    "Estimator",
    "Leap",
    "Reptile",
    "build",
    "meta_gradient",
    "task_at",
]

ALGORITHMS: dict[str, Callable[..., Estimator]] = {
    "maml": MAML,
    "fomaml": lambda loss, inner, **kw: MAML(loss, inner, first_order=True, **kw),
    "anil": ANIL,
    "reptile": Reptile,
    "leap": Leap,
    "imaml": IMAML,
}
"""Name -> constructor ``(loss, inner, **options) -> estimator``."""


def build(name: str, loss: LossFn, inner: InnerSolver, **options: Any) -> Estimator:
    """The estimator registered as ``name`` (see :data:`ALGORITHMS`)."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}: choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name](loss, inner, **options)


def task_at(tasks: Task, i: int) -> Task:
    """Task ``i`` of a batch of tasks."""
    return Task(*(type(b)(*(t[i] for t in b)) for b in tasks))


def meta_gradient(
    estimator: Estimator,
    theta: Params,
    tasks: Task,
    mode: Literal["loop", "vmap"] = "loop",
    chunk: int | None = None,
) -> tuple[Params, Metrics]:
    """The mean meta-gradient and mean metrics over a batch of tasks (tasks on dim 0).

    The gradient has ``theta``'s keys, shapes and dtypes. Raises ``ValueError`` naming the task
    and inner step of a non-finite loss; nothing is read back to the host before that check.
    """
    check_task(tasks, batched=True)
    theta = tree.detach(theta)
    n = tasks.support.x.shape[0]
    if n == 0:
        raise ValueError("the batch holds no task: sample at least one task (dim 0 of the tensors)")
    if mode == "loop":
        total, per_task = None, []
        for i in range(n):
            grad, metrics = _fast.meta_grad(estimator, theta, task_at(tasks, i))
            total = grad if total is None else tree.add(total, grad)
            per_task.append(metrics)
        grads = tree.scale(total, 1.0 / n)
        metrics = {k: torch.stack([m[k] for m in per_task]) for k in per_task[0]}
    elif mode == "vmap":
        batched = torch.func.vmap(estimator.meta_grad, in_dims=(None, 0), chunk_size=chunk)
        grads, metrics = batched(theta, tasks)
        grads = {k: v.mean(0) for k, v in grads.items()}
    else:
        raise ValueError(f"mode={mode!r}: use 'loop' or 'vmap'")
    check_finite(metrics)
    return grads, {k: v.mean(0) for k, v in metrics.items()}
