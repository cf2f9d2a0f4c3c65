"""Task utilities: one task of a batch, a slice of a batch, batches joined, tasks moved.

A batch of tasks is a :class:`~metagrad.Task` whose tensors carry the task index on dim 0. Every
function here maps one tensor operation over the task's four tensors, so code elsewhere never
rebuilds ``Task(Batch(...), Batch(...))`` by hand.

>>> import torch, metagrad as mg
>>> tasks = mg.data.Sinusoid(shots=5, queries=5).sample(4, torch.Generator().manual_seed(0))
>>> mg.tasks.count(tasks), mg.tasks.select(tasks, slice(0, 2)).support.x.shape[0]
(4, 2)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from metagrad._types import Batch, Task

__all__ = ["count", "join", "map_tensors", "select", "stack", "task_at", "to_device"]


def map_tensors(tasks: Task, f: Callable[[Tensor], Tensor]) -> Task:
    """``tasks`` with ``f`` applied to each of its four tensors."""
    return Task(
        Batch(f(tasks.support.x), f(tasks.support.y)), Batch(f(tasks.query.x), f(tasks.query.y))
    )


def count(tasks: Task) -> int:
    """The number of tasks in a batch (the size of dim 0)."""
    return int(tasks.support.x.shape[0])


def task_at(tasks: Task, i: int) -> Task:
    """Task ``i`` of a batch of tasks (the task dim removed)."""
    return map_tensors(tasks, lambda t: t[i])


def select(tasks: Task, index: slice | Sequence[int] | Tensor) -> Task:
    """The tasks at ``index`` (a slice, indices or a mask), still a batch."""
    return map_tensors(tasks, lambda t: t[index])


def stack(tasks: Sequence[Task]) -> Task:
    """Single tasks stacked into a batch (a new dim 0)."""
    return _combine(tasks, torch.stack)


def join(batches: Sequence[Task], device: torch.device | str | None = None) -> Task:
    """Batches of tasks concatenated on dim 0 (moved to ``device`` when given)."""
    joined = _combine(batches, torch.cat)
    return joined if device is None else to_device(joined, device)


def to_device(tasks: Task, device: torch.device | str) -> Task:
    """``tasks`` on ``device``."""
    return map_tensors(tasks, lambda t: t.to(device))


def _combine(parts: Sequence[Task], op: Callable[[list[Tensor]], Tensor]) -> Task:
    if not parts:
        raise ValueError("no tasks to combine: give at least one task")

    def part(side: str, name: str) -> Tensor:
        return op([getattr(getattr(p, side), name) for p in parts])

    return Task(
        Batch(part("support", "x"), part("support", "y")),
        Batch(part("query", "x"), part("query", "y")),
    )
