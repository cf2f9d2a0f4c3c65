"""Sinusoid regression (Finn et al., 2017): ``y = A sin(x - phase)``, one curve per task."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from metagrad._types import Batch, Task


class SineParams(NamedTuple):
    """The true curve of each task: ``amplitude`` and ``phase``, each of shape ``(n_tasks,)``."""

    amplitude: Tensor
    phase: Tensor

    def curve(self, x: Tensor) -> Tensor:
        """``A sin(x - phase)`` per task: ``x`` of shape ``(m,)`` or ``(n_tasks, m, 1)`` gives
        ``(n_tasks, m, 1)`` (e.g. ``torch.linspace(-5, 5, 200)`` to plot the truth)."""
        if x.dim() == 1:
            x = x.view(1, -1, 1)
        return self.amplitude.view(-1, 1, 1) * torch.sin(x - self.phase.view(-1, 1, 1))


@dataclass(frozen=True)
class Sinusoid:
    """Regression tasks ``y = A sin(x - phase)`` with ``A ~ U[amplitude]``, ``phase ~ U[phase]``
    and inputs ``x ~ U[x_range]`` (the defaults are MAML's: A in [0.1, 5], phase in [0, pi],
    x in [-5, 5]).

    ``sample(n, generator)`` returns a :class:`~metagrad.Task` with ``support.x``, ``support.y`` of
    shape ``(n, shots, 1)`` and the query of shape ``(n, queries, 1)``, float32; support and query
    points are independent draws from the same curve. The distribution is infinite and each call is
    a pure function of the generator's state: four ``torch.rand`` draws (amplitude, phase, support
    x, query x).

    Example::

        task, truth = Sinusoid().sample_with_params(25, torch.Generator().manual_seed(0))
        grid = torch.linspace(-5, 5, 200)
        plt.plot(grid, truth.curve(grid)[0, :, 0])
    """

    shots: int = 10
    queries: int = 10
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)

    def __post_init__(self) -> None:
        for name in ("shots", "queries"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("amplitude", "phase", "x_range"):
            low, high = getattr(self, name)
            if not low <= high:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(low, high)}")

    def sample(self, n_tasks: int, generator: torch.Generator) -> Task:
        """``n_tasks`` regression tasks stacked on dim 0."""
        return self.sample_with_params(n_tasks, generator)[0]

    def sample_with_params(
        self, n_tasks: int, generator: torch.Generator
    ) -> tuple[Task, SineParams]:
        """The same tasks as :meth:`sample` (same draws), with the true amplitudes and phases."""
        if not isinstance(n_tasks, int) or n_tasks < 1:
            raise ValueError(f"n_tasks must be a positive integer, got {n_tasks!r}")

        def uniform(bounds: tuple[float, float], *shape: int) -> Tensor:
            u = torch.rand(*shape, generator=generator, device=generator.device)
            return bounds[0] + (bounds[1] - bounds[0]) * u

        truth = SineParams(uniform(self.amplitude, n_tasks), uniform(self.phase, n_tasks))
        x_support = uniform(self.x_range, n_tasks, self.shots, 1)
        x_query = uniform(self.x_range, n_tasks, self.queries, 1)
        task = Task(Batch(x_support, truth.curve(x_support)), Batch(x_query, truth.curve(x_query)))
        return task, truth
