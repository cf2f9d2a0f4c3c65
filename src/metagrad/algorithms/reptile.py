r"""Reptile: move :math:`\theta` towards the adapted weights.

Nichol, Achiam & Schulman (2018), *On First-Order Meta-Learning Algorithms*.

For one task the "gradient" is :math:`g = \theta - \phi`, with :math:`\phi` the result of the inner
solver on the support set (or on support and query together, ``use_query=True``). An outer SGD
step of size :math:`\epsilon` gives Reptile's interpolation
:math:`\theta \leftarrow \theta + \epsilon (\phi - \theta)`; any ``torch.optim`` optimiser
(Adam in the paper's Omniglot runs) takes it as an ordinary gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metagrad import tree
from metagrad._types import Batch, InnerSolver, LossFn, Metrics, Params, Task
from metagrad.algorithms._base import EstimatorBase, scored, task_metrics


@dataclass(frozen=True, eq=False)
class Reptile(EstimatorBase):
    """Reptile: ``g = theta - phi``; no graph of the inner loop is built."""

    loss: LossFn
    inner: InnerSolver
    use_query: bool = False

    def meta_grad(self, theta: Params, task: Task) -> tuple[Params, Metrics]:
        batch = task.support
        if self.use_query:
            batch = Batch(*(torch.cat(pair) for pair in zip(task.support, task.query, strict=True)))
        adapted = self.inner(self.loss, theta, batch)
        query_loss, accuracy = scored(self.loss)(adapted.params, task.query)
        metrics = task_metrics(self.loss, adapted, task.query, query_loss, accuracy)
        return tree.sub(theta, adapted.params), metrics
