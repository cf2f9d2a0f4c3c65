r"""MAML, first-order MAML and ANIL.

Finn, Abbeel & Levine (2017), *Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks*;
Raghu et al. (2020), *Rapid Learning or Feature Reuse?* (ANIL).

With the inner solver :math:`\phi(\theta) = \mathrm{Alg}(\theta, \mathcal{D}^{s})`, the
meta-gradient for one task is

.. math::  g = \frac{d}{d\theta} L_q(\phi(\theta)) = J_\phi(\theta)^\top \nabla L_q(\phi),

differentiated through the unrolled inner loop. First-order MAML takes :math:`J_\phi = I`:
:math:`g = \nabla L_q(\phi)`. ANIL adapts only the head (``head`` name prefixes); the body still
receives its gradient through the query loss.

>>> import metagrad as mg, torch
>>> model = mg.models.MLP()
>>> maml = mg.MAML(mg.loss_fn(model, "mse"), mg.GradientDescent(lr=0.01, steps=1))
>>> task = mg.data.Sinusoid(shots=10, queries=10).sample(1, torch.Generator().manual_seed(0))
>>> grad, metrics = maml(mg.params_of(model), mg.task_at(task, 0))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from metagrad import autodiff
from metagrad._types import Adapted, Batch, InnerSolver, LossFn, Metrics, Params, Task
from metagrad.algorithms._base import EstimatorBase, scored, task_metrics


@dataclass(frozen=True, eq=False)
class MAML(EstimatorBase):
    """MAML (second order by default; ``first_order=True`` is FOMAML); ``head`` makes it ANIL."""

    loss: LossFn
    inner: InnerSolver
    first_order: bool = False
    head: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.head is not None:
            head = (self.head,) if isinstance(self.head, str) else tuple(self.head)
            if not head or not all(isinstance(p, str) and p for p in head):
                raise ValueError(f"head={self.head!r}: give name prefixes, e.g. head=('head.',)")
            object.__setattr__(self, "head", head)

    def keys(self, theta: Params) -> list[str] | None:
        """The adapted parameter names: all (None), or those starting with a ``head`` prefix."""
        if self.head is None:
            return None
        keys = [k for k in theta if k.startswith(self.head)]
        if not keys:
            raise ValueError(
                f"head={self.head} matches no parameter; the names are {list(theta)}: give "
                "prefixes of the head's names, e.g. head=('head.',)"
            )
        return keys

    def meta_grad(self, theta: Params, task: Task) -> tuple[Params, Metrics]:
        keys = self.keys(theta)
        score = scored(self.loss)
        if self.first_order:  # J = I: the query gradient at phi
            adapted = self.inner(self.loss, theta, task.support, keys=keys)
            grad, (query_loss, accuracy) = autodiff.grad_and_value(score, has_aux=True)(
                adapted.params, task.query
            )
        else:  # d/dtheta L_q(phi(theta)), through the unrolled solver

            def query_loss_of(th: Params) -> tuple[Tensor, tuple[tuple, Tensor | None]]:
                adapted = self.inner(self.loss, th, task.support, keys=keys)
                value, accuracy = score(adapted.params, task.query)
                return value, (adapted[:2], accuracy)

            grad, (query_loss, (aux, accuracy)) = autodiff.grad_and_value(
                query_loss_of, has_aux=True
            )(theta)
            adapted = Adapted(*aux)
        return grad, task_metrics(self.loss, adapted, task.query, query_loss, accuracy)

    def _adapt(self, theta: Params, support: Batch) -> Adapted:
        return self.inner(self.loss, theta, support, keys=self.keys(theta))


def ANIL(  # noqa: N802 (a constructor, named like the class it stands for)
    loss: LossFn,
    inner: InnerSolver,
    head: Sequence[str] = ("head.",),
    first_order: bool = False,
) -> MAML:
    """ANIL: MAML whose inner loop adapts only the parameters named with a ``head`` prefix."""
    return MAML(loss, inner, first_order=first_order, head=tuple(head))
