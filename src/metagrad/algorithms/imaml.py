r"""iMAML: implicit meta-gradients of a proximally regularised inner problem.

Rajeswaran, Finn, Kakade & Levine (2019), *Meta-Learning with Implicit Gradients*.

The inner problem is :math:`\phi^*(\theta) = \arg\min_\phi L_s(\phi) + \tfrac{\lambda}{2}
\|\phi - \theta\|^2`, solved approximately from :math:`\theta` by the inner solver (gradient
descent: iMAML-GD; Newton-CG: iMAML-HF). Its optimality condition
:math:`\nabla L_s(\phi) + \lambda(\phi - \theta) = 0` gives, by the implicit function theorem,
:math:`d\phi/d\theta = (I + H_s(\phi)/\lambda)^{-1}`, so the meta-gradient is the solution of

.. math::  \left(I + \tfrac{1}{\lambda} H_s(\phi)\right) v = \nabla L_q(\phi),

found by ``cg_steps`` of conjugate gradient on Hessian-vector products. No graph of the inner
loop is kept: memory does not depend on the number of inner steps.

The paper's form is the default. The authors' released code damps the system to
:math:`(1 + c) v + H_s v / (\lambda + d) = \nabla L_q`; ``cg_damping=c`` and ``lam_damping=d``
reproduce it (that code's defaults: ``cg_damping=1.0, lam_damping=10.0``).
"""

from __future__ import annotations

from dataclasses import dataclass

from metagrad import autodiff, linalg, tree
from metagrad._types import Adapted, Batch, InnerSolver, LossFn, Metrics, Params, Task
from metagrad.algorithms._base import EstimatorBase, scored, task_metrics


@dataclass(frozen=True, eq=False)
class IMAML(EstimatorBase):
    """iMAML: the implicit meta-gradient ``v = (I + H_s(phi)/lam)^{-1} grad L_q(phi)``."""

    loss: LossFn
    inner: InnerSolver
    lam: float = 1.0
    cg_steps: int = 5
    cg_tol: float = 0.0
    cg_damping: float = 0.0
    lam_damping: float = 0.0

    def __post_init__(self) -> None:
        if not self.lam > 0:
            raise ValueError(f"lam={self.lam}: the proximal regularisation must be > 0")
        if self.cg_steps < 0:
            raise ValueError(f"cg_steps={self.cg_steps}: the number of CG steps must be >= 0")
        if self.cg_damping < 0 or self.lam_damping < 0:
            raise ValueError(
                f"cg_damping={self.cg_damping}, lam_damping={self.lam_damping}: must be >= 0 "
                "(0 and 0 is the paper's form)"
            )

    def proximal_loss(self, theta: Params) -> LossFn:
        """``L_s(phi) + lam/2 ||phi - theta||^2``, the inner objective."""
        return lambda phi, batch: (
            self.loss(phi, batch) + 0.5 * self.lam * tree.sqnorm(tree.sub(phi, theta))
        )

    def _adapt(self, theta: Params, support: Batch) -> Adapted:
        return self.inner(self.proximal_loss(theta), theta, support)

    def meta_grad(self, theta: Params, task: Task) -> tuple[Params, Metrics]:
        adapted = self._adapt(theta, task.support)
        phi = tree.detach(adapted.params)
        grad_query, (query_loss, accuracy) = autodiff.grad_and_value(
            scored(self.loss), has_aux=True
        )(phi, task.query)
        _, _, hvp = autodiff.hessian_at(lambda p: self.loss(p, task.support), phi)

        def matvec(v: Params) -> Params:  # (1 + c) v + H_s v / (lam + d)
            return tree.axpy(
                1.0 / (self.lam + self.lam_damping), hvp(v), tree.scale(v, 1 + self.cg_damping)
            )

        v, residual = linalg.cg(matvec, grad_query, self.cg_steps, self.cg_tol)
        metrics = task_metrics(self.loss, adapted, task.query, query_loss, accuracy)
        metrics["cg_residual"] = residual.detach()
        return v, metrics
