"""Types shared by every module: parameters, batches, tasks, and the sampler / solver / estimator
protocols."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

Params = dict[str, Tensor]
"""Parameters as a plain dict, keyed like ``module.named_parameters()``."""

Metrics = dict[str, Tensor]


class Batch(NamedTuple):
    """Inputs ``x`` and targets ``y``; dim 0 indexes examples (or tasks, then examples)."""

    x: Tensor
    y: Tensor


class Task(NamedTuple):
    """A support set to adapt on and a query set to score on.

    For a batch of tasks every tensor carries the task index on dim 0:
    ``support.x`` has shape ``(tasks, examples, *features)``.
    """

    support: Batch
    query: Batch


LossFn = Callable[[Params, Batch], Tensor]
"""``loss(params, batch) -> scalar``, the mean over the batch's examples."""


class Adapted(NamedTuple):
    """What an inner solver returns.

    ``params`` are the adapted parameters ``phi``; ``losses`` holds the loss before each inner
    step (shape ``(steps,)``). With ``record=True``, ``path`` is ``[theta^0, ..., theta^K]``,
    ``grads`` the gradients at ``theta^0 .. theta^{K-1}`` and ``path_losses`` the ``K + 1`` losses
    along the path. ``state`` is the solver's own state after the last step (Adam's moments, a
    velocity: the entries of its state other than ``"params"``), where the solver has one.
    """

    params: Params
    losses: Tensor
    path: list[Params] | None = None
    grads: list[Params] | None = None
    path_losses: Tensor | None = None
    state: dict[str, Params] | None = None


class Posterior(NamedTuple):
    """A mean-field Gaussian over the parameters: ``mean`` and ``std``, both keyed like them.

    What a probabilistic estimator's ``adapt`` returns (:class:`metagrad.ProbabilisticIMAML`).
    """

    mean: Params
    std: Params


class TaskSampler(Protocol):
    """A task family: ``sample(n, generator) -> Task``, ``n`` tasks stacked on dim 0.

    Deterministic given the generator; never the global random state.
    """

    def sample(self, n: int, generator: torch.Generator) -> Task: ...


class InnerSolver(Protocol):
    """``solver(loss, init, batch, *, keys=None, record=False) -> Adapted``.

    ``keys`` restricts adaptation to those parameter names (the others pass through unchanged).
    A solver is differentiable whenever it is called under an outer ``torch.func`` transform.
    """

    @property
    def steps(self) -> int: ...

    def __call__(
        self,
        loss: LossFn,
        init: Params,
        batch: Batch,
        *,
        keys: Sequence[str] | None = None,
        record: bool = False,
    ) -> Adapted: ...


class Estimator(Protocol):
    """A meta-gradient estimator: ``estimator(theta, task) -> (meta_grad, metrics)``, one task.

    ``meta_grad`` is pure and takes its gradients through :mod:`metagrad.autodiff`, so that the
    same code runs one task at a time and under ``vmap``. :class:`metagrad.EstimatorBase` gives
    ``__call__``, ``adapt`` and ``init_meta``; a frozen dataclass with ``loss`` and ``inner``
    fields and a ``meta_grad`` method, subclassing it, is an estimator.
    """

    @property
    def loss(self) -> LossFn: ...

    def init_meta(self, model: nn.Module) -> Params: ...

    def meta_grad(self, theta: Params, task: Task) -> tuple[Params, Metrics]: ...

    def __call__(self, theta: Params, task: Task) -> tuple[Params, Metrics]: ...

    def adapt(self, theta: Params, support: Batch) -> Params | Posterior: ...
