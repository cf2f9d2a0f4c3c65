"""The estimators, their registry, and batching over a batch of tasks.

``meta_gradient(estimator, theta, tasks)`` averages the per-task meta-gradient over the tasks on
dim 0 of ``tasks``: ``mode="loop"`` runs one task at a time on plain autograd (on a CPU the faster
and far leaner mode, see ``benchmarks/bench_meta.py`` and ``docs/PERFORMANCE.md``);
``mode="vmap"`` vectorises the tasks with ``torch.func.vmap``, in chunks of ``chunk`` tasks when
given.

On a CPU, ``loop`` spreads the tasks over ``workers`` threads (by default one per intra-op thread
of torch, each worker then running its operators on one thread): the convolutions of one small
task keep two cores busy poorly, two tasks side by side keep them busy well. Each worker adapts
its own contiguous share of the tasks with its own replica of the model's skeleton (the same
parameter and buffer tensors, a separate module object, since ``functional_call`` swaps a module's
attributes while it runs); the shares are summed in a fixed order, so the result does not depend on
the threads' timing.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import torch

from metagrad import _fast, tree
from metagrad._types import InnerSolver, LossFn, Metrics, Params, Task
from metagrad.algorithms._base import Estimator, check_finite, check_task
from metagrad.algorithms.imaml import IMAML
from metagrad.algorithms.leap import Leap
from metagrad.algorithms.maml import ANIL, MAML
from metagrad.algorithms.reptile import Reptile
from metagrad.models import Loss

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
    workers: int | None = None,
) -> tuple[Params, Metrics]:
    """The mean meta-gradient and mean metrics over a batch of tasks (tasks on dim 0).

    The gradient has ``theta``'s keys, shapes and dtypes. Raises ``ValueError`` naming the task
    and inner step of a non-finite loss; nothing is read back to the host before that check.
    ``workers`` (``mode="loop"``) is the number of threads the tasks are spread over: by default
    ``torch.get_num_threads()`` on a CPU when the estimator's loss is a :class:`metagrad.Loss`
    (whose model can be replicated), else 1; ``workers=1`` runs the tasks one after another.
    """
    check_task(tasks, batched=True)
    theta = tree.detach(theta)
    n = tasks.support.x.shape[0]
    if n == 0:
        raise ValueError("the batch holds no task: sample at least one task (dim 0 of the tensors)")
    if workers is not None and workers < 1:
        raise ValueError(f"workers={workers}: give a number of threads >= 1, or None (automatic)")
    if mode == "loop":
        k = min(n, _default_workers(estimator, tasks) if workers is None else workers)
        if k > 1 and _replicable(estimator) is None:
            raise ValueError(
                f"workers={workers}: only an estimator whose loss is a metagrad Loss (from "
                "metagrad.loss_fn) can run on several threads; pass workers=1"
            )
        total, per_task = _loop(estimator, theta, tasks, k)
        grads = tree.scale(total, 1.0 / n)
        metrics = {key: torch.stack([m[key] for m in per_task]) for key in per_task[0]}
    elif mode == "vmap":
        batched = torch.func.vmap(estimator.meta_grad, in_dims=(None, 0), chunk_size=chunk)
        grads, metrics = batched(theta, tasks)
        grads = {key: v.mean(0) for key, v in grads.items()}
    else:
        raise ValueError(f"mode={mode!r}: use 'loop' or 'vmap'")
    check_finite(metrics)
    return grads, {key: v.mean(0) for key, v in metrics.items()}


def _share(
    estimator: Estimator, theta: Params, tasks: Task, indices: range
) -> tuple[Params, list[Metrics]]:
    """The summed meta-gradient and the per-task metrics of the tasks at ``indices``."""
    total: Params | None = None
    per_task = []
    for i in indices:
        grad, metrics = _fast.meta_grad(estimator, theta, task_at(tasks, i))
        total = grad if total is None else tree.add(total, grad)
        per_task.append(metrics)
    assert total is not None
    return total, per_task


def _loop(
    estimator: Estimator, theta: Params, tasks: Task, workers: int
) -> tuple[Params, list[Metrics]]:
    n = tasks.support.x.shape[0]
    if workers <= 1:
        return _share(estimator, theta, tasks, range(n))
    bounds = [round(j * n / workers) for j in range(workers + 1)]
    replicas = _replicas(estimator, workers)
    threads = torch.get_num_threads()
    per_worker = max(1, threads // workers)
    device = tasks.support.x.device.type
    autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))

    def work(j: int) -> tuple[Params, list[Metrics]]:
        torch.set_num_threads(per_worker)  # this thread's operators; restored below
        # Autocast is thread-local: the caller's setting, in this thread too.
        with torch.autocast(device, dtype=autocast[1], enabled=autocast[0]):
            return _share(replicas[j], theta, tasks, range(bounds[j], bounds[j + 1]))

    try:
        shares = list(_pool(workers).map(work, range(workers)))
    finally:
        torch.set_num_threads(threads)
    total = shares[0][0]
    for grad, _ in shares[1:]:
        total = tree.add(total, grad)
    return total, [m for _, metrics in shares for m in metrics]


def _default_workers(estimator: Estimator, tasks: Task) -> int:
    if tasks.support.x.device.type != "cpu" or _replicable(estimator) is None:
        return 1
    return torch.get_num_threads()


def _replicable(estimator: Estimator) -> Loss | None:
    """The estimator's :class:`Loss` when the estimator is a dataclass holding one, else None."""
    loss = getattr(estimator, "loss", None)
    if dataclasses.is_dataclass(estimator) and isinstance(loss, Loss):
        return loss
    return None


_REPLICAS: weakref.WeakKeyDictionary[Estimator, list[Estimator]] = weakref.WeakKeyDictionary()
_POOLS: dict[int, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


def _replicas(estimator: Estimator, k: int) -> list[Estimator]:
    """``estimator`` and ``k - 1`` copies whose loss holds a separate module sharing its tensors."""
    with _LOCK:
        have = _REPLICAS.setdefault(estimator, [estimator])
        loss = _replicable(estimator)
        assert loss is not None
        while len(have) < k:
            model = loss.model
            shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
            twin = dataclasses.replace(loss, model=copy.deepcopy(model, memo=shared))
            have.append(dataclasses.replace(estimator, loss=twin))  # type: ignore[type-var]
        return have[:k]


def _pool(k: int) -> ThreadPoolExecutor:
    with _LOCK:
        if k not in _POOLS:
            _POOLS[k] = ThreadPoolExecutor(k, thread_name_prefix="metagrad-task")
        return _POOLS[k]
