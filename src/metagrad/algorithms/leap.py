r"""Leap: learn an initialisation that shortens the learning path over the loss surface.

Flennerhag, Moreno, Lawrence & Damianou (2019), *Transferring Knowledge across Learning Processes*.

The inner solver records the path :math:`\theta^0 = \theta, \theta^1, \dots, \theta^K` and its
losses :math:`f^k = L_s(\theta^k)`. In the space of (parameters, loss) the step
:math:`k` is :math:`\Delta_k = (\theta^{k+1} - \theta^k,\; f^{k+1} - f^k)`. With
:math:`\theta^{k+1}` held fixed and the Jacobian :math:`d\theta^k / d\theta` taken as the
identity, the gradient of the path's energy :math:`\tfrac12 \sum_k \|\Delta_k\|^2` (``"energy"``,
Leap's :math:`d_2`) or length :math:`\sum_k \|\Delta_k\|` (``"length"``, :math:`d_1`) is

.. math::  g = -\sum_{k=0}^{K-1} \frac{(\theta^{k+1} - \theta^k) + \Delta f_k \, \nabla f(\theta^k)}
              {\|\Delta_k\|^{p}}, \qquad p = 0 \text{ (energy)}, \; 1 \text{ (length)}.

``loss_term=False`` drops :math:`\Delta f_k` (then, with the energy,
:math:`g = \theta^0 - \theta^K`, Reptile's direction). The stabiliser replaces :math:`\Delta f_k`
by :math:`-|\Delta f_k|`, so that a step on which the loss rose never pulls :math:`\theta` uphill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from metagrad import tree
from metagrad._types import InnerSolver, LossFn, Metrics, Params, Task
from metagrad.algorithms._base import EstimatorBase, scored, task_metrics


@dataclass(frozen=True, eq=False)
class Leap(EstimatorBase):
    """Leap's meta-gradient: a pure function of the recorded path and its losses."""

    loss: LossFn
    inner: InnerSolver
    metric: Literal["energy", "length"] = "energy"
    loss_term: bool = True
    stabilizer: bool = True

    def __post_init__(self) -> None:
        if self.metric not in ("energy", "length"):
            raise ValueError(
                f"metric={self.metric!r}: use 'energy' (d2) or 'length' (d1) for Leap's path metric"
            )

    def meta_grad(self, theta: Params, task: Task) -> tuple[Params, Metrics]:
        adapted = self.inner(self.loss, theta, task.support, record=True)
        path, grads, f = adapted.path, adapted.grads, adapted.path_losses
        assert path is not None and grads is not None and f is not None
        g = tree.zeros_like(theta)
        for k in range(len(grads)):
            step = tree.sub(path[k + 1], path[k])
            df = f[k + 1] - f[k]
            if self.stabilizer:
                df = -df.abs()
            if not self.loss_term:
                df = torch.zeros_like(df)
            term = tree.axpy(df, grads[k], step)
            if self.metric == "length":
                length = torch.sqrt(tree.sqnorm(step) + df**2)
                term = tree.scale(term, 1.0 / torch.clamp(length, min=torch.finfo(df.dtype).tiny))
            g = tree.sub(g, term)
        query_loss, accuracy = scored(self.loss)(adapted.params, task.query)
        return g, task_metrics(self.loss, adapted, task.query, query_loss, accuracy)
