r"""Reptile: move :math:`\theta` towards the adapted weights.

Nichol, Achiam & Schulman (2018), *On First-Order Meta-Learning Algorithms*.

For one task the "gradient" is :math:`g = \theta - \phi`, with :math:`\phi` the result of the inner
solver on the support set (or on support and query together, ``use_query=True``). An outer SGD
step of size :math:`\epsilon` gives Reptile's interpolation
:math:`\theta \leftarrow \theta + \epsilon (\phi - \theta)`; any ``torch.optim`` optimiser
(Adam in the paper's Omniglot runs) takes it as an ordinary gradient.

``carry_state=True`` keeps the inner solver's own state (Adam's moments and step count) from task
to task, as the paper's released code does with one Adam optimiser for all tasks, at test time
too: the state lives in the meta-parameters under :data:`STATE`, is not learned, and after each
meta-batch becomes the solver's :meth:`~metagrad.inner.Adam.carry` of the tasks' final states;
each test task starts from the state training left.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from metagrad import tree
from metagrad._types import Adapted, Batch, InnerSolver, LossFn, Metrics, Params, Task
from metagrad.algorithms._base import EstimatorBase, scored, task_metrics

STATE = "inner_state."
"""Key prefix of the carried inner state in the meta-parameters: ``inner_state.v.<param>``."""


@dataclass(frozen=True, eq=False)
class Reptile(EstimatorBase):
    """Reptile: ``g = theta - phi``; no graph of the inner loop is built."""

    loss: LossFn
    inner: InnerSolver
    use_query: bool = False
    carry_state: bool = False
    hyper_prefixes: ClassVar[tuple[str, ...]] = (STATE,)
    carried_prefixes: ClassVar[tuple[str, ...]] = (STATE,)

    def __post_init__(self) -> None:
        if self.carry_state and not hasattr(self.inner, "carry"):
            raise ValueError(
                f"carry_state=True: the inner solver {type(self.inner).__name__} has no state to "
                "carry from task to task; use the adam inner solver (--inner adam), or drop "
                "--inner-carry"
            )

    def init_meta(self, model: nn.Module) -> Params:
        """``theta``, and with ``carry_state`` the solver's starting state under ``STATE``."""
        theta = super().init_meta(model)
        if not self.carry_state:
            return theta
        state = self.inner.carried(tree.detach(theta))  # type: ignore[attr-defined]
        return {**theta, **_flat(state)}

    def _inner(self, meta: Params, batch: Batch) -> Adapted:
        """The inner solver from ``meta``'s model entries, and from its carried state if any."""
        model = self.model_params(meta)
        if not self.carry_state:
            return self.inner(self.loss, model, batch)
        return self.inner(self.loss, model, batch, start=_nested(meta))  # type: ignore[call-arg]

    def _adapt(self, theta: Params, support: Batch) -> Adapted:
        return self._inner(theta, support)

    def meta_grad(self, theta: Params, task: Task) -> tuple[Params, Metrics]:
        """``theta - phi``; with ``carry_state``, the task's final solver state under ``STATE``
        (averaged over the tasks like a gradient, for :meth:`carry`)."""
        batch = task.support
        if self.use_query:
            batch = Batch(*(torch.cat(pair) for pair in zip(task.support, task.query, strict=True)))
        adapted = self._inner(theta, batch)
        query_loss, accuracy = scored(self.loss)(adapted.params, task.query)
        metrics = task_metrics(self.loss, adapted, task.query, query_loss, accuracy)
        grad = tree.sub(self.model_params(theta), adapted.params)
        if self.carry_state and adapted.state is not None:
            grad.update(_flat(adapted.state))  # the task's final state ("count" as it started)
        return grad, metrics

    def carry(self, meta: Params, mean: Params, tasks: int) -> Params:
        """The carried state after a meta-batch of ``tasks`` tasks, from ``mean``, the mean of
        what :meth:`meta_grad` returned under ``STATE``."""
        if not self.carry_state:
            return {}
        new = self.inner.carry(_nested(meta), _nested(mean), tasks)  # type: ignore[attr-defined]
        return _flat(new)


def _flat(state: dict[str, Params]) -> Params:
    return {f"{STATE}{entry}.{name}": v for entry, p in state.items() for name, v in p.items()}


def _nested(meta: Params) -> dict[str, Params]:
    out: dict[str, Params] = {}
    for key, value in meta.items():
        if key.startswith(STATE):
            entry, name = key[len(STATE) :].split(".", 1)
            out.setdefault(entry, {})[name] = value
    return out
