"""Batching: the mean meta-gradient over a batch of tasks, by a loop, threads or ``vmap``.

``meta_gradient(estimator, theta, tasks)`` averages the estimator's own per-task ``meta_grad``
over the tasks on dim 0 of ``tasks``; every mode runs that same code, only the backend of
:mod:`metagrad.autodiff` differs, set once here:

- ``mode="loop"`` (``"autograd"`` backend): one task at a time on plain autograd. On a CPU the
  tasks are spread over ``workers`` threads (by default one per intra-op thread of torch, each
  worker then running its operators on one thread): the convolutions of one small task keep two
  cores busy poorly, two tasks side by side keep them busy well. Each worker adapts its own
  contiguous share of the tasks with its own replica of the model's skeleton (the same parameter
  and buffer tensors, a separate module object, since ``functional_call`` swaps a module's
  attributes while it runs); the shares are summed in a fixed order, so the result does not
  depend on the threads' timing.
- ``mode="vmap"`` (``"func"`` backend): the tasks vectorised with ``torch.func.vmap``, in chunks
  of ``chunk`` tasks when given.

Which is faster depends on the shapes; ``docs/PERFORMANCE.md`` has the measurements.
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch

from metagrad import autodiff, tree
from metagrad._types import Estimator, Metrics, Params, Task
from metagrad.algorithms._base import check_finite, check_task
from metagrad.models import Loss
from metagrad.tasks import count, task_at

Mode = Literal["loop", "vmap"]
MODES: tuple[Mode, ...] = ("loop", "vmap")

__all__ = ["MODES", "Mode", "meta_gradient"]


def meta_gradient(
    estimator: Estimator,
    theta: Params,
    tasks: Task,
    mode: Mode = "loop",
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
    n = count(tasks)
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
        with autodiff.use("autograd"):
            total, per_task = _loop(estimator, theta, tasks, k)
        grads = tree.scale(total, 1.0 / n)
        metrics = {key: torch.stack([m[key] for m in per_task]) for key in per_task[0]}
    elif mode == "vmap":
        batched = torch.func.vmap(estimator.meta_grad, in_dims=(None, 0), chunk_size=chunk)
        with autodiff.use("func"):
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
        grad, metrics = estimator.meta_grad(theta, task_at(tasks, i))
        total = grad if total is None else tree.add(total, grad)
        per_task.append(metrics)
    assert total is not None
    return total, per_task


def _loop(
    estimator: Estimator, theta: Params, tasks: Task, workers: int
) -> tuple[Params, list[Metrics]]:
    n = count(tasks)
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

    # Each worker runs in a copy of this context, so the autodiff backend holds there too.
    contexts = [contextvars.copy_context() for _ in range(workers)]
    try:
        shares = list(_pool(workers).map(lambda j: contexts[j].run(work, j), range(workers)))
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
